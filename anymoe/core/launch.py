"""Run a function in N local worker processes joined by a real process group.

Tests and parity runs need real multi-process worlds (gloo on the CPU) that fail instead of
hanging. ``launch(fn, world_size, args)`` starts the workers with torch.multiprocessing on a
free TCP port, initialises torch.distributed in each, calls ``fn(rank, world_size, *args)``,
and returns every rank's return value (anything ``torch.save`` can write) in rank order.
A worker's exception is re-raised here with its traceback; a world that does not finish in
``timeout_s`` is terminated and raises ``TimeoutError``.

This is a test and single-machine helper, not a launcher for real jobs: those use torchrun
(see ``anymoe.core.parallel.init_distributed``).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, dist_backend: str,
            args: Sequence[Any], out_dir: str, threads: int, timeout_s: float,
            env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    # Workers share few cores: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(threads)
    dist.init_process_group(dist_backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        try:  # nobody closes its connections while a peer still reads them (gloo aborts)
            dist.barrier()
        except RuntimeError:  # a peer failed and left: its own error is the one launch reports
            pass
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *,
           dist_backend: str = "gloo", timeout_s: float = 120.0, start_method: str = "spawn",
           threads: int = 1, env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; their results in rank order.

    ``fn`` must be importable by name (a module-level function) when ``start_method`` is
    "spawn". "fork" starts faster but only suits a parent that has not started threads.
    """
    last_error: Exception | None = None
    for _attempt in range(3):  # another process may grab the free port before rank 0 binds it
        try:
            return _launch_once(fn, world_size, args, dist_backend, timeout_s, start_method, threads,
                                env or {})
        except mp.ProcessRaisedException as err:
            if "Address already in use" not in str(err) and "EADDRINUSE" not in str(err):
                raise
            last_error = err
    raise RuntimeError(f"could not find a free port for {world_size} workers") from last_error


def _launch_once(fn: Callable[..., Any], world_size: int, args: Sequence[Any], dist_backend: str,
                 timeout_s: float, start_method: str, threads: int, env: dict[str, str]) -> list[Any]:
    with tempfile.TemporaryDirectory(prefix="anymoe-launch-") as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(fn, world_size, free_port(), dist_backend, tuple(args), out_dir, threads, timeout_s, env),
            nprocs=world_size, join=False, start_method=start_method)
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                for p in ctx.processes:
                    p.join(5)
                raise TimeoutError(f"{world_size} workers running {getattr(fn, '__name__', fn)} did not "
                                   f"finish in {timeout_s:.0f} s (a collective probably hangs)")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


__all__ = ["free_port", "launch"]
