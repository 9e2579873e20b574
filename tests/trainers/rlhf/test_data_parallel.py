"""Data-parallel RLHF on real gloo processes: the same steps as one process on the same data.

- The GRPO update of 2 ranks equals one process's update on the union of their rows (seq-mean:
  the mean over ranks of equal-sized means is the global mean; token-mean: each rank's term
  rescaled by its share of the tokens), including a rank that runs out of micro-batches first
  (it joins the gradient average with none).
- DPO over `anymoe rlhf dpo --nproc 2` takes the same steps as one process with twice the
  gradient accumulation (same global batch): losses, gradient norms, final weights, and the
  held-out metrics (each rank evaluates a share of the batches).
- GRPO over `--nproc 2` runs end to end, writes one model, and a resumed run reproduces the
  uninterrupted one bit for bit (each rank's sampling stream is in the checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anymoe.core.backend import get_backend
from anymoe.core.launch import launch
from anymoe.core.parallel import ParallelConfig, build_parallel_groups
from anymoe.trainers.checkpoint import CheckpointManager
from anymoe.trainers.distributed import DistEnv
from anymoe.trainers.rlhf.config import load_rlhf_config
from anymoe.trainers.rlhf.data_parallel import DataParallel
from anymoe.trainers.rlhf.grpo import GRPOTrainer
from anymoe.trainers.rlhf.ppo import PPOTrainer

ROOT = Path(__file__).resolve().parents[3]
QUIET = ["logging.progress=false", "logging.plots=false", "checkpoint.at_end=false", "eval.every=0",
         "eval.at_end=false"]


def _grpo(run_dir: Path, rank: int = 0, world: int = 1, groups=None, micro_batch: int = 2,
          agg: str = "seq-mean", algo: str = "grpo") -> GRPOTrainer:
    """A GRPO trainer, or with algo "ppo" a PPO one with GAE (a critic) on the same prompts."""
    extra = ["rlhf.policy.advantage=gae", "rlhf.critic.lr=1e-2"] if algo == "ppo" else []
    cfg = load_rlhf_config(ROOT / "configs/rlhf/grpo_addition.yaml", algo,
                           [*QUIET, f"rlhf.policy.loss_agg={agg}", f"rlhf.policy.micro_batch={micro_batch}",
                            "rlhf.rollout.prompts_per_step=2", "rlhf.rollout.samples_per_prompt=3",
                            "optim.lr=1e-2", "train.steps=4", *extra])
    cls = PPOTrainer if algo == "ppo" else GRPOTrainer
    trainer = cls(cfg, run_dir, get_backend("cpu"), dist=DistEnv(rank, world), groups=groups)
    trainer.build()
    return trainer


def _weights(trainer) -> dict[str, torch.Tensor]:
    """The policy's weights, and the critic's (prefixed) where there is one."""
    out = {k: v.clone() for k, v in trainer.actor.module.state_dict().items()}
    if trainer.critic is not None:
        out.update({f"critic.{k}": v.clone() for k, v in trainer.critic.module.state_dict().items()})
    return out


def _global_experience(trainer: GRPOTrainer):
    """Six rows sampled from a fixed stream: the same on every rank."""
    items = [trainer.bundle.train[i] for i in range(2)]
    trainer.generator.manual_seed(123)
    exps, _ = trainer.rollout.make_experience([dict(it.row, answer=it.answer) for it in items],
                                              [it.prompt for it in items])
    assert len(exps) == 1 and exps[0].batch_size == 6, [e.batch_size for e in exps]
    exp = exps[0]
    # Rows of unequal length (a fresh policy runs every answer to max_new_tokens): the ranks' first
    # micro-batches then hold different token counts, which token-mean must weigh.
    exp.mask_BR[0, -2:] = 0
    exp.mask_BR[1, -1:] = 0
    return exp


def _update_worker(rank: int, world: int, tmp: str, agg: str, algo: str) -> dict[str, torch.Tensor] | None:
    groups = build_parallel_groups(ParallelConfig(), "cpu", num_experts=4)
    trainer = _grpo(Path(tmp) / f"dp{rank}", rank, world, groups, agg=agg, algo=algo)
    exp = _global_experience(trainer)
    # rank 0: rows 0-3 (two micro-batches), rank 1: rows 4-5 (one): rank 1 runs out first.
    mine = exp.select(torch.arange(0, 4) if rank == 0 else torch.arange(4, 6))
    trainer.engine.update([mine])
    if rank != 0:
        return None
    state = _weights(trainer)
    # One process: micro-step 1 = both ranks' first micro-batches, micro-step 2 = rank 0's second.
    ref = _grpo(Path(tmp) / "ref", micro_batch=4, agg=agg, algo=algo)  # one micro-batch per update below
    ref_exp = _global_experience(ref)
    ref.engine.update([ref_exp.select(torch.tensor([0, 1, 4, 5]))])
    ref.engine.update([ref_exp.select(torch.tensor([2, 3]))])
    return {"dp": state, "ref": _weights(ref), "init": _weights(_grpo(Path(tmp) / "init", algo=algo))}


@pytest.mark.multiproc
@pytest.mark.parametrize("algo,agg", [("grpo", "seq-mean"), ("grpo", "token-mean"),  # token shares
                                      ("ppo", "token-mean")])  # the critic's value loss too
def test_policy_update_over_two_ranks_equals_one_process_on_the_union(tmp_path, algo, agg):
    out = launch(_update_worker, 2, (str(tmp_path), agg, algo), timeout_s=300)[0]
    for critic in (False, True) if algo == "ppo" else (False,):
        keys = [k for k in out["ref"] if k.startswith("critic.") == critic]
        moved = max((out["ref"][k] - out["init"][k]).abs().max().item() for k in keys)
        assert moved > 1e-3, f"the reference update did not move the {'critic' if critic else 'policy'}"
    for k, ref in out["ref"].items():
        err = (out["dp"][k] - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), (k, err)


def _reductions_worker(rank: int, world: int) -> dict:
    dp = DataParallel(build_parallel_groups(ParallelConfig(), "cpu", num_experts=4))
    mine = {"a": 1.0, "nonfinite": 1.0} if rank == 0 else {"a": 3.0, "b": 5.0, "nonfinite": 0.0}
    return {"mean": dp.mean(mine), "max": dp.max(rank + 2), "shard": dp.shard(list(range(6))),
            "gather": dp.gather(torch.arange(rank + 1, dtype=torch.float32)).tolist(),
            "any": dp.any(rank == 1), "sum": dp.sum([rank, 1.0])}


@pytest.mark.multiproc
def test_reductions_over_ranks():
    """Statistics a rank lacks (every micro-step skipped) are averaged over the ranks that have them."""
    r0, r1 = launch(_reductions_worker, 2, (), timeout_s=120)
    assert r0["mean"] == r1["mean"] == {"a": 2.0, "b": 5.0, "nonfinite": 1.0}
    assert r0["max"] == r1["max"] == 3
    assert (r0["shard"], r1["shard"]) == ([0, 1, 2], [3, 4, 5])
    assert r0["gather"] == r1["gather"] == [0.0, 0.0, 1.0]
    assert r0["any"] and r1["any"] and r0["sum"] == [1.0, 2.0]


def _cli(tmp_path: Path, algo: str, name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "anymoe", "rlhf", algo, str(ROOT / f"configs/rlhf/{algo}_addition.yaml"),
           "--out", str(tmp_path / name), *[a for s in QUIET for a in ("--set", s)], *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "exitcode: -6" in proc.stderr:
        # The rare gloo abort of a torchrun worker on a loaded 2-core host (seen once in the CI run of
        # a clean clone, not in 13 reruns; tests/trainers/test_dp_ep_match.py has the same guard):
        # show it and run the command once more (a fresh directory unless it resumes).
        print("first torchrun attempt aborted; retrying:\n" + proc.stderr[-3000:], file=sys.stderr)
        if "--resume" not in args:
            shutil.rmtree(tmp_path / name, ignore_errors=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.multiproc
def test_dpo_two_processes_take_the_steps_of_one(tmp_path):
    common = ["--steps", "3", "--set", "train.micro_batch=4", "--set", "checkpoint.at_end=true",
              "--set", "eval.at_end=true"]  # the held-out batches split over the ranks, then summed
    _cli(tmp_path, "dpo", "one", *common, "--set", "train.grad_accum=2")
    _cli(tmp_path, "dpo", "two", *common, "--set", "train.grad_accum=1", "--nproc", "2")
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step, row in one.items():
        for key in ("loss", "grad_norm", "margin", "chosen_reward"):
            assert two[step][key] == pytest.approx(row[key], rel=1e-4, abs=1e-7), (step, key)
    assert one[3]["loss"] != one[1]["loss"]  # the steps moved the policy
    ends = [json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[-1]) for n in ("one", "two")]
    for key in ("eval_margin", "eval_accuracy"):
        assert ends[1][key] == pytest.approx(ends[0][key], rel=1e-4, abs=1e-7), key
    ckpt = [CheckpointManager(tmp_path / n / "checkpoints").latest_valid() for n in ("one", "two")]
    a, b = (CheckpointManager.load(p, "model.pt") for p in ckpt)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    assert sorted(p.name for p in ckpt[1].glob("rank*.pt")) == ["rank00000.pt", "rank00001.pt"]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2


@pytest.mark.multiproc
def test_grpo_two_processes_resume_bit_for_bit(tmp_path):
    common = ["--nproc", "2", "--set", "rlhf.rollout.prompts_per_step=4", "--set", "checkpoint.every=2",
              "--set", "checkpoint.keep_last=2", "--set", "eval.at_end=true", "--set", "rlhf.eval_prompts=9"]
    _cli(tmp_path, "grpo", "straight", "--steps", "3", *common)
    _cli(tmp_path, "grpo", "resumed", "--steps", "2", *common)
    _cli(tmp_path, "grpo", "resumed", "--steps", "3", *common, "--resume")
    straight, resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "resumed")
    assert sorted(straight) == sorted(resumed) == [1, 2, 3]
    for step, row in straight.items():
        for key in ("loss", "reward_mean", "reward_std", "grad_norm", "response_len"):
            assert resumed[step][key] == row[key], (step, key)
    ends = [json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[-1]) for n in ("straight",
                                                                                               "resumed")]
    assert ends[0]["eval_reward"] == ends[1]["eval_reward"]  # 9 greedy prompts split 5 / 4 over the ranks
    ckpt = CheckpointManager(tmp_path / "straight" / "checkpoints").latest_valid()
    names = sorted(p.name for p in ckpt.iterdir())
    assert "model.pt" in names and "rl_state.pt" in names and "rl_state_rank00001.pt" in names
    s0 = CheckpointManager.load(ckpt, "rl_state.pt")["generator"]
    s1 = CheckpointManager.load(ckpt, "rl_state_rank00001.pt")["generator"]
    assert not torch.equal(s0, s1)  # each rank samples from its own stream


@pytest.mark.multiproc
def test_grpo_resumes_a_one_process_run_on_two(tmp_path):
    """A checkpoint of one process continues on two: rank 1 has no sampling state there and draws
    its own stream (not a copy of rank 0's)."""
    common = ["--set", "rlhf.rollout.prompts_per_step=4", "--set", "checkpoint.every=2"]
    _cli(tmp_path, "grpo", "grow", "--steps", "2", *common)
    _cli(tmp_path, "grpo", "grow", "--steps", "3", *common, "--resume", "--nproc", "2",
         "--set", "checkpoint.at_end=true")
    rows = _rows(tmp_path / "grow")
    assert sorted(rows) == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows.values())
    ckpt = CheckpointManager(tmp_path / "grow" / "checkpoints").latest_valid()
    s0 = CheckpointManager.load(ckpt, "rl_state.pt")["generator"]
    s1 = CheckpointManager.load(ckpt, "rl_state_rank00001.pt")["generator"]
    assert not torch.equal(s0, s1)


def test_prompts_must_divide_over_the_processes(tmp_path, capsys):
    from anymoe.cli import main

    code = main(["rlhf", "grpo", str(ROOT / "configs/rlhf/grpo_addition.yaml"), "--out", str(tmp_path / "r"),
                 "--nproc", "3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "rlhf.rollout.prompts_per_step" in err and "3" in err
    assert not (tmp_path / "r").exists()  # refused before any work
