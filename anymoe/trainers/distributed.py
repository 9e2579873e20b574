"""Process start-up for multi-process training: torchrun's environment, or `--nproc N`.

Under torchrun (or its elastic agent) the ranks come from RANK / WORLD_SIZE / LOCAL_RANK and
the rendezvous from MASTER_ADDR / MASTER_PORT. ``anymoe train --nproc N`` does not start
processes itself: it re-runs the same command under ``torch.distributed.run`` (torchrun)
with ``--standalone --nproc_per_node N``, so there is one launcher, PyTorch's.

The process group uses the backend's collective library (``backend.dist_backend``: gloo on
the CPU); a world of one process creates no group at all.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart_count: int = 0  # torchrun's elastic restarts so far

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor, group=None) -> torch.Tensor:
        """In-place sum over ``group`` (default: all ranks); a no-op for one process."""
        if self.initialized:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor, group=None) -> torch.Tensor:
        if self.initialized:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
        return tensor


def env_from_launcher() -> DistEnv:
    """Ranks set by torchrun (or defaults for one process)."""
    try:
        return DistEnv(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                       local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                       restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))
    except ValueError as err:
        raise RuntimeError(f"malformed torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {err}") from None


def init_distributed(backend, timeout_s: float = 300.0) -> DistEnv:
    """Join the process group of this job with the backend's collective library."""
    env = env_from_launcher()
    backend.bind(env.local_rank)
    if env.world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set: start with torchrun or "
                               "`anymoe train --nproc N`")
        kwargs = {}
        if backend.device_type != "cpu":
            kwargs["device_id"] = backend.device(env.local_rank)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _attempt_store(env, timeout)
        if store is not None:
            kwargs["store"] = store
        dist.init_process_group(backend=backend.dist_backend, rank=env.rank, world_size=env.world_size,
                                timeout=timeout, **kwargs)
    return env


def _attempt_store(env: DistEnv, timeout: datetime.timedelta):
    """Under torchrun's agent, the store keys of this restart attempt only.

    The agent's TCPStore outlives a restart, and the keys a process group writes there (each
    rank's listening address) are not namespaced by attempt: after an elastic restart, ranks
    read the dead processes' addresses and the gloo mesh fails with "connection refused"
    (seen with torch 2.13 --standalone). A prefix per attempt keeps the rounds apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    tcp = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                        is_master=False, timeout=timeout)
    return dist.PrefixStore(f"anymoe/attempt_{env.restart_count}", tcp)


def shutdown(wait_for_peers: bool = False) -> None:
    """Leave the process group; after a completed run, once every rank is here.

    Without the barrier a rank that finishes first closes its gloo connections while a peer
    may still be reading from them; gloo then throws on a background thread and the peer
    aborts (SIGABRT), failing a run whose work was complete. Failure paths skip it: a peer
    that died would hold the barrier until the process-group timeout.
    """
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def worker_argv(command: list[str], run_dir, args, flags: tuple[str, ...] = ("steps", "seed", "backend")
                ) -> list[str]:
    """The command line each torchrun worker re-runs: ``command`` (e.g. ``["train", CONFIG]``), the
    run directory, the ``--flag value`` pairs of ``args`` that were given, every ``--set`` and
    ``--resume`` (no ``--nproc``: the workers learn the world from torchrun's environment)."""
    argv = [*command, "--out", str(run_dir)]
    for name in flags:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name}", str(value)]
    for item in args.overrides:
        argv += ["--set", item]
    if args.resume:
        argv.append("--resume")
    return argv


def relaunch(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Run ``anymoe <argv>`` under torchrun with ``nproc`` local processes; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "anymoe", *argv]
    env = dict(os.environ)
    # Two or more ranks on a few cores: one thread each unless the user chose otherwise.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


__all__ = ["DistEnv", "env_from_launcher", "init_distributed", "relaunch", "shutdown", "worker_argv"]
