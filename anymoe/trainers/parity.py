"""`anymoe parity run | compare`: loss parity across backends, EP sizes and precisions.

``run`` trains a config in parity mode (dropout off, deterministic algorithms where the
backend has them, weights initialised on the CPU from the seed, data order from the seed
only) and writes the per-step curve. ``compare`` prints a table of the differences, draws
the curves, and exits 1 when any pair is over tolerance, so CI can gate on it.
"""

from __future__ import annotations

import argparse
import sys

from anymoe.trainers.curves import compare, format_table, plot_curves, read_curve, write_report_json


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="train in parity mode and write the per-step curve (JSONL)")
    run.add_argument("config", help="YAML config")
    run.add_argument("--out", required=True, help="curve file to write (JSONL)")
    run.add_argument("--backend", default="auto", help="cpu, cuda, npu or auto")
    run.add_argument("--ep", type=int, default=1, help="expert-parallel size (starts this many processes)")
    run.add_argument("--nproc", type=int, default=None, help="processes (default: --ep); DP = nproc / ep")
    run.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    run.add_argument("--steps", type=int, default=None, help="steps to run (default: the config's)")
    run.add_argument("--sizing", default=None,
                     help="force an expert sizing policy: identity, pow2, multiple_of:N")
    run.add_argument("--resume-at", type=int, default=None,
                     help="stop after this step, then resume from its checkpoint (proves resume parity)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--run-dir", default=None,
                     help="keep the run's checkpoints and metrics here (default: a temp folder, removed)")
    cmp = sub.add_parser("compare", help="compare curves against the first one")
    cmp.add_argument("curves", nargs="+", help="curve files; the first is the reference")
    cmp.add_argument("--rtol", type=float, default=1e-5, help="max relative loss difference allowed")
    cmp.add_argument("--plot", default=None, help="write a PNG of the curves and their difference")
    cmp.add_argument("--json", default=None, help="also write the table (and each curve's meta) as JSON")


def run(args: argparse.Namespace) -> int:
    if args.action == "compare":
        return run_compare(args.curves, args.rtol, args.plot, getattr(args, "json", None))
    from anymoe.trainers.parity_run import parity_run

    return parity_run(args)


def run_compare(paths: list[str], rtol: float, plot: str | None, json_out: str | None = None) -> int:
    if len(paths) < 2:
        print("anymoe parity compare: give at least two curve files", file=sys.stderr)
        return 2
    try:
        curves = [read_curve(p) for p in paths]
    except (OSError, ValueError) as err:
        print(f"anymoe parity compare: {err}", file=sys.stderr)
        return 2
    for other in curves[1:]:
        ref_recipe, recipe = curves[0].meta.get("recipe_sha256"), other.meta.get("recipe_sha256")
        if ref_recipe and recipe and ref_recipe != recipe:
            print(f"note: {other.path} was trained from another recipe (model, data, optimiser, seed or "
                  f"steps) than {curves[0].path}; its differences are not a parity measurement",
                  file=sys.stderr)
    reports = [compare(curves[0], other, rtol) for other in curves[1:]]
    print(format_table(reports, rtol))
    if plot:
        plot_curves(curves, reports, plot)
        print(f"plot written to {plot}")
    if json_out:
        write_report_json(json_out, curves, reports, rtol)
    return 0 if all(r.ok() for r in reports) else 1
