"""Multi-node on one machine: two torchrun agents (``--nnodes 2 --node_rank 0/1``, c10d
rendezvous on 127.0.0.1) run one DP x EP job (2 nodes x 2 processes, ep 2: experts split inside
a node, replicas across nodes); its loss curve equals the single-process run (fp32, gloo)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anymoe.trainers.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CFG = {
    "name": "nodes",
    "model": {"preset": "tiny", "vocab_size": 259, "d_model": 32, "max_seq_len": 32,
              "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32}},
    "data": {"format": "text", "path": "shipped:tiny_corpus.txt", "seq_len": 32, "eval_split": 0.02},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
    "train": {"steps": 3, "micro_batch": 2, "global_batch": 8, "precision": "fp32"},
    "logging": {"progress": False, "plots": False, "tensorboard": False},
    "checkpoint": {"at_end": False},
    "eval": {"batches": 1},
}


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


@pytest.mark.multiproc
@pytest.mark.parametrize("ep", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_two_torchrun_agents_equal_the_single_process_run(tmp_path, ep):
    """ep 2: experts split inside a node, replicas across nodes (dp 2 x ep 2); ep 4: the EP group
    spans both nodes (the auto dispatcher picks hierarchical: intra-node, then inter-node)."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    cmd = [sys.executable, "-m", "anymoe", "train", str(cfg), "--out", str(tmp_path / "one")]
    single = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    agents = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
               "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "anymoe-test", "-m", "anymoe", "train", str(cfg), "--out", str(tmp_path / "two"),
               "--set", f"parallel.ep={ep}"]
        agents.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True))
    outputs = []
    try:
        for agent in agents:
            out, _ = agent.communicate(timeout=400)
            outputs.append(out)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for agent, out in zip(agents, outputs):
        assert agent.returncode == 0, out[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    log = "".join(outputs)
    assert f"4 process(es) (dp {4 // ep} x ep {ep})" in log
