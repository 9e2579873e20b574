"""`anymoe export onnx CKPT OUT.onnx`: an inference graph (logits from input ids) for ONNX Runtime."""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=["onnx"], help="export format")
    parser.add_argument("checkpoint", help="anymoe or Hugging Face checkpoint directory")
    parser.add_argument("output", help="the .onnx file to write")
    parser.add_argument(
        "--exporter",
        choices=["dynamo", "legacy"],
        default="dynamo",
        help="torch.export-based (default) or TorchScript exporter",
    )
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip onnx.checker and the ONNX Runtime vs PyTorch comparison",
    )
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference allowed")


def run(args: argparse.Namespace) -> int:
    from anymoe.core.config import ConfigError
    from anymoe.models.io import from_pretrained
    from anymoe.models.onnx_export import export_onnx, verify_onnx

    try:
        model = from_pretrained(args.checkpoint)
        path = export_onnx(model, args.output, exporter=args.exporter, opset=args.opset)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"anymoe export: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    if args.no_verify:
        return 0
    diffs = verify_onnx(model, path)
    worst = max(diffs)
    print(f"onnx.checker ok; ONNX Runtime vs PyTorch max |logit diff| {worst:.2e} on shapes (1, 5), (3, 17)")
    if worst > args.tolerance:
        print(f"anymoe export: difference {worst:.2e} exceeds --tolerance {args.tolerance}", file=sys.stderr)
        return 1
    return 0
