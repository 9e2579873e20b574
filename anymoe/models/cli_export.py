"""`anymoe export onnx CKPT OUT.onnx`: an inference graph (logits from input ids) for ONNX Runtime.

The graph is always traced on the CPU (fp32). ``--backend NAME`` (default auto) selects only where
the PyTorch reference logits of the check are computed, so the exported graph is compared with
the model as the named backend runs it; an unusable backend stops the command before any work.
"""

from __future__ import annotations

import argparse
import sys

from anymoe.backends.env import add_backend_option, backend_from_args


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
    add_backend_option(parser, "where the check's PyTorch reference logits run: auto (default), cpu, cuda "
                               "or npu; the graph itself is always traced on the CPU")


def run(args: argparse.Namespace) -> int:
    from anymoe.core.config import ConfigError
    from anymoe.models.io import from_pretrained
    from anymoe.models.onnx_export import export_onnx, verify_onnx

    backend = backend_from_args(args)  # exits with the one-line reason if unusable
    try:
        model = from_pretrained(args.checkpoint, backend=backend)
        path = export_onnx(model, args.output, exporter=args.exporter, opset=args.opset)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"anymoe export: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    if args.no_verify:
        return 0
    diffs = verify_onnx(model, path, device=backend.device())
    worst = max(diffs)
    print(f"onnx.checker ok; ONNX Runtime vs PyTorch ({backend.name}) max |logit diff| {worst:.2e} "
          "on shapes (1, 5), (3, 17)")
    if worst > args.tolerance:
        print(f"anymoe export: difference {worst:.2e} exceeds --tolerance {args.tolerance}", file=sys.stderr)
        return 1
    return 0
