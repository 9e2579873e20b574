"""`anymoe generate CKPT --prompt TEXT`: sample text from an anymoe or Hugging Face checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="anymoe or Hugging Face checkpoint directory")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="'bytes' or a local tokenizer directory (default: the checkpoint's own "
        "tokenizer files if present, else bytes)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stop-token",
        type=int,
        action="append",
        default=None,
        help="token id that ends a row (default: the tokenizer's eos)",
    )
    parser.add_argument("--backend", default="auto", help="auto | cpu | cuda | npu (default auto)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def _tokenizer(spec: str | None, ckpt: Path):
    from anymoe.data.tokenizers import build_tokenizer

    if spec is None:
        has_own = any((ckpt / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        spec = str(ckpt) if has_own else "bytes"
    return build_tokenizer(spec, "--tokenizer")


def run(args: argparse.Namespace) -> int:
    from anymoe.core.backend import get_backend
    from anymoe.core.config import ConfigError
    from anymoe.models.generate import generate
    from anymoe.models.io import from_pretrained

    ckpt = Path(args.checkpoint)
    try:
        backend = get_backend(args.backend)
        tok = _tokenizer(args.tokenizer, ckpt)
        model = from_pretrained(ckpt, backend=backend).to(backend.device())
        if tok.vocab_size > model.cfg.vocab_size:
            raise ConfigError(
                "--tokenizer",
                f"produces ids up to {tok.vocab_size - 1} but the model's "
                f"vocabulary is {model.cfg.vocab_size}; pass the checkpoint's tokenizer",
            )
        prompts = [tok.encode(p) or [tok.bos_id] for p in args.prompt]
        stops = args.stop_token if args.stop_token is not None else [tok.eos_id]
        out = generate(
            model,
            prompts,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            stop_tokens=stops,
            pad_id=tok.pad_id,
            seed=args.seed,
            use_cache=not args.no_cache,
        )
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"anymoe generate: {err}", file=sys.stderr)
        return 2
    for b, text in enumerate(args.prompt):
        new = out.tokens[b, : int(out.lengths[b])].tolist()
        completion = tok.decode(new)
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": text,
                        "completion": completion,
                        "tokens": new,
                        "logprobs": [round(float(x), 5) for x in out.logprobs[b, : len(new)]],
                    }
                )
            )
        else:
            print(f"{text}{completion}")
    return 0
