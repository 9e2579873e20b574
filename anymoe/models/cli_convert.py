"""`anymoe convert SRC DST --to hf|anymoe`: checkpoints between anymoe and Hugging Face formats.

SRC is any directory ``anymoe.models.from_pretrained`` reads (anymoe checkpoint, trainer
checkpoint with its run's config.yaml, or a Hugging Face Mixtral / Qwen2-MoE / Qwen3-MoE /
DeepSeek-V3 / Llama / Qwen2 directory). Experts are written canonical (unpadded).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="source checkpoint directory")
    parser.add_argument("dst", help="destination directory (written atomically)")
    parser.add_argument("--to", choices=["hf", "anymoe"], required=True, help="output format")
    parser.add_argument(
        "--arch",
        default=None,
        help="Hugging Face model_type for --to hf (default: the one that expresses the config)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="cast the weights on the way out (default: keep)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from anymoe.core.config import ConfigError
    from anymoe.models.hf import CheckpointMismatch
    from anymoe.models.io import from_pretrained, save_pretrained

    try:
        model = from_pretrained(args.src)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        out = save_pretrained(model, args.dst, format=args.to, hf_arch=args.arch, dtype=dtype)
    except (ConfigError, CheckpointMismatch, FileNotFoundError, ValueError) as err:
        print(f"anymoe convert: {err}", file=sys.stderr)
        return 2
    copied = copy_tokenizer_files(Path(args.src), out)
    total = model.num_parameters()
    extra = f"; tokenizer files: {', '.join(copied)}" if copied else ""
    print(f"wrote {args.to} checkpoint {out} ({total / 1e6:.1f}M parameters){extra}")
    return 0


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Carry the tokenizer (and generation defaults) along, so the converted directory is complete."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
