"""`python -m anymoe` (and `torchrun -m anymoe`) runs the CLI."""

from anymoe.cli import main

raise SystemExit(main())
