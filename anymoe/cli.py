"""`anymoe <command>`: each command lives in the module that owns its work.

A command module defines ``configure(parser)`` and ``run(args) -> int``. Modules load only
when their command runs, so `anymoe env` stays fast and works when optional packages are
missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("anymoe.trainers.cli_train", "train an MoE language model from a YAML config"),
    "rlhf": ("anymoe.trainers.rlhf.cli", "post-train with a reward model, DPO, PPO or GRPO"),
    "parity": ("anymoe.trainers.parity", "record and compare loss curves across backends"),
    "convert": ("anymoe.models.cli_convert", "convert checkpoints between anymoe and Hugging Face"),
    "export": ("anymoe.models.cli_export", "export a checkpoint for inference (ONNX)"),
    "generate": ("anymoe.models.cli_generate", "generate text from a checkpoint"),
    "plot": ("anymoe.trainers.plots", "draw PNG plots of a run directory"),
    "env": ("anymoe.backends.env", "show the backends usable here and the package versions"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anymoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"anymoe {name}", description=COMMANDS[name][1])
    module.configure(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
