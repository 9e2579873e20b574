"""Summarise a backend conformance run (pytest JUnit XML) as JSON, with the machine's facts.

    PYTHONPATH=. python bench/conformance.py RESULTS.xml OUT.json [--label cuda-h100]

The JSON holds: passed / failed / skipped counts, every test's outcome (and the skip or
failure message), `anymoe env --json` facts (backends, devices, versions) and the GPU name
where there is one. ci/gpu_conformance.sh and ci/npu_conformance.sh call it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")


def parse_junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "")[:500]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": tests}


def machine_facts() -> dict:
    from anymoe.backends.env import collect

    facts = collect()
    try:
        import torch

        if torch.cuda.is_available():
            facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            facts["cuda"] = torch.version.cuda
    except Exception as err:  # a summary must still be written
        facts["gpus_error"] = str(err)
    return facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("junit")
    ap.add_argument("out")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summary = {"label": args.label, "utc": now,
               **parse_junit(Path(args.junit)), "machine": machine_facts()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    c = summary["counts"]
    print(f"{args.label or 'conformance'}: {c['passed']} passed, {c['failed'] + c['error']} failed, "
          f"{c['skipped']} skipped -> {args.out}")


if __name__ == "__main__":
    main()
