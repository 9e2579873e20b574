"""`anymoe env`: the table, --json, and --backend NAME exiting 1 with the one-line reason."""

import json

import pytest

from anymoe.cli import main
from anymoe.core.backend import probe_backends


def test_table_lists_every_backend_and_the_default(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for name in probe_backends():
        assert f"\n{name} " in out
    assert "default (backend: auto): " in out and "torch " in out and "torch-npu" in out


def test_json_facts(capsys):
    assert main(["env", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in facts["backends"]}
    assert {"cpu", "cuda", "npu"} <= names
    cpu = next(r for r in facts["backends"] if r["name"] == "cpu")
    assert cpu["available"] and cpu["devices"] >= 1 and cpu["dist_backend"] == "gloo"
    assert facts["default"] in names and "deepspeed" in facts["versions"]


def test_check_one_usable_backend(capsys):
    assert main(["env", "--backend", "cpu"]) == 0
    assert "backend 'cpu' is usable" in capsys.readouterr().out


@pytest.mark.parametrize("name", [n for n, s in probe_backends().items() if not s.ok] + ["tpu"])
def test_check_unusable_or_unknown_backend_exits_1(name, capsys):
    assert main(["env", "--backend", name]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("anymoe: ")
    if name == "tpu":
        assert "valid backends: auto, cpu, cuda, npu" in err


def test_backend_option_for_other_commands():
    import argparse

    from anymoe.backends.env import add_backend_option, backend_from_args

    parser = argparse.ArgumentParser()
    add_backend_option(parser)
    assert backend_from_args(parser.parse_args(["--backend", "cpu"])).name == "cpu"
    assert backend_from_args(parser.parse_args([]), configured="cpu").name == "cpu"
    with pytest.raises(SystemExit) as err:
        backend_from_args(parser.parse_args(["--backend", "nope"]))
    assert str(err.value).startswith("anymoe: unknown backend 'nope'")
