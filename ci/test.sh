#!/usr/bin/env bash
# The README's test command: lint, then the default (CPU) test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check anymoe tests bench
python3 -m pytest -q "$@"
