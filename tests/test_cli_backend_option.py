"""Every command that runs work takes `--backend NAME`; an unusable one stops it with a non-zero
exit and one line naming the backend and why, before any work (no run folder, curve or file
written, no checkpoint read: the checkpoint paths here do not even exist).

`plot` and `convert` do no device work and take no --backend (checked below too)."""

import argparse
import importlib

import pytest

from anymoe.cli import COMMANDS, main
from anymoe.core.backend import get_backend


def _npu_unusable() -> str:
    try:
        get_backend("npu")
    except Exception as err:  # BackendUnavailable
        return str(err)
    pytest.skip("npu is usable here: nothing to refuse")


def _run(argv):
    try:
        return main(argv)
    except SystemExit as exit_:  # backend_from_args exits with the message, like the interpreter does
        code = exit_.code
        if isinstance(code, str):
            import sys

            print(code, file=sys.stderr)
            return 1
        return code


def _commands(tmp):
    missing = str(tmp / "no_such_checkpoint")
    return {
        "train": (["train", "configs/tiny.yaml", "--out", str(tmp / "run"), "--backend", "npu"], tmp / "run"),
        "rlhf": (["rlhf", "grpo", "configs/rlhf/grpo_addition.yaml", "--out", str(tmp / "rl"),
                  "--backend", "npu"], tmp / "rl"),
        "generate": (["generate", missing, "--prompt", "hi", "--backend", "npu"], None),
        "parity run": (["parity", "run", "configs/parity.yaml", "--out", str(tmp / "curve.jsonl"),
                        "--backend", "npu"], tmp / "curve.jsonl"),
        "env": (["env", "--backend", "npu"], None),
        "export onnx": (["export", "onnx", missing, str(tmp / "m.onnx"), "--backend", "npu"], tmp / "m.onnx"),
    }


@pytest.mark.parametrize("command", ["train", "rlhf", "generate", "parity run", "env", "export onnx"])
def test_unusable_backend_is_refused_before_any_work(command, tmp_path, capsys):
    reason = _npu_unusable()
    argv, artefact = _commands(tmp_path)[command]
    rc = _run(argv)
    err = capsys.readouterr().err
    assert rc not in (0, None), err
    lines = [line for line in err.splitlines() if "npu" in line]
    assert len(lines) == 1 and "backend 'npu' is not usable here" in lines[0] and "torch_npu" in lines[0], err
    assert reason in lines[0]
    assert "no_such_checkpoint" not in err  # the backend was checked before the checkpoint was read
    if artefact is not None:
        assert not artefact.exists()


@pytest.mark.parametrize("command", ["plot", "convert"])
def test_commands_without_device_work_take_no_backend(command):
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).configure(parser)
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for action in parser._actions:  # sub-commands (convert to-hf / from-hf ...)
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action.choices, dict):
                flags |= {o for a in action.choices[sub]._actions for o in a.option_strings}
    assert "--backend" not in flags
