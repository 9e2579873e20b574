"""Process start-up: torchrun's environment, and the command `--nproc N` re-runs under torchrun."""

import argparse

import pytest

from anymoe.trainers.cli_train import _argv_for_workers, configure
from anymoe.trainers.distributed import env_from_launcher


def test_env_from_torchrun_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    env = env_from_launcher()
    assert (env.rank, env.world_size, env.local_rank, env.restart_count, env.is_main) == (0, 1, 0, 0, True)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    env = env_from_launcher()
    assert (env.rank, env.world_size, env.local_rank, env.restart_count, env.is_main) == (3, 4, 1, 2, False)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(RuntimeError, match="malformed torchrun environment"):
        env_from_launcher()


def test_workers_get_the_same_command_without_nproc(tmp_path):
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["cfg.yaml", "--nproc", "2", "--steps", "5", "--seed", "3",
                              "--set", "optim.lr=1e-3", "--set", "parallel.ep=2", "--resume",
                              "--max-restarts", "1"])
    argv = _argv_for_workers(args, tmp_path / "run")
    assert argv == ["train", "cfg.yaml", "--out", str(tmp_path / "run"), "--steps", "5", "--seed", "3",
                    "--set", "optim.lr=1e-3", "--set", "parallel.ep=2", "--resume"]
