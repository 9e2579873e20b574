"""Checkpoints that survive being killed mid-write, truncated files and full disks.

Layout of ``RUN_DIR/checkpoints``::

    step_00000100/           one finished checkpoint
        manifest.json        step, file names, sizes and sha256 checksums (written last)
        model.pt             canonical (unpadded) model state dict
        optim.pt             optimizer state, canonical shapes
        rank00000.pt ...     per-rank state: RNG streams, data sampler, counters
    .tmp-step_00000200/      a checkpoint being written (never read)

Writing: every rank writes its files into the temp folder and fsyncs them; rank 0 hashes
them, writes the manifest (fsync), renames the folder to its final name (an atomic rename
on POSIX) and fsyncs the parent, then deletes checkpoints beyond ``keep_last``. A process
killed at any moment leaves either the previous checkpoint set or the new one, never a
half-written folder under a final name.

Reading: ``latest_valid()`` walks the finished checkpoints newest first and checks each
file's size and sha256 against the manifest; a truncated or corrupted one is reported with
the file at fault and the next older one is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and what to do."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def probe_writable(directory: Path, need_bytes: int = 0) -> None:
    """Fail now, before training, if ``directory`` cannot hold a checkpoint.

    Writes (and fsyncs, then deletes) a probe file of ``min(need_bytes, 64 MiB)`` so a full
    disk or a read-only mount shows up as one clear error instead of a lost checkpoint later.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot create the output directory {str(directory)!r}: {err.strerror}; "
                              "pass a writable --out RUN_DIR") from None
    free = shutil.disk_usage(directory).free
    if need_bytes and free < need_bytes:
        raise CheckpointError(
            f"not enough disk space in {str(directory)!r}: a checkpoint needs about "
            f"{need_bytes / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free; free space or pass another --out")
    probe = directory / f".write-probe-{os.getpid()}"
    size = min(max(need_bytes, 4096), 64 << 20)
    try:
        with open(probe, "wb") as fh:
            chunk = b"\0" * min(size, 1 << 20)
            left = size
            while left > 0:
                fh.write(chunk[:left])
                left -= len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        raise CheckpointError(f"output directory {str(directory)!r} is not writable ({err.strerror}); "
                              "fix its permissions, free disk space, or pass another --out") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def _fault_pause(step: int) -> None:
    """Fault injection for the reliability tests: ANYMOE_FAULT_PAUSE_IN_CHECKPOINT="STEP:SECONDS"
    announces itself on stderr and sleeps after checkpoint STEP's data files are written and
    before its manifest and rename, so a test can SIGKILL the process mid-write."""
    spec = os.environ.get("ANYMOE_FAULT_PAUSE_IN_CHECKPOINT")
    if spec and int(spec.split(":")[0]) == step:
        import time

        print(f"checkpoint-write-paused step={step}", file=sys.stderr, flush=True)
        time.sleep(float(spec.split(":")[1]))


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    """Atomic, checksummed, keep-last-N checkpoints in one folder, for one or many ranks.

    ``barrier`` synchronises ranks (a no-op for one process); only rank 0 renames and prunes.
    """

    def __init__(self, root: str | Path, keep_last: int = 3, rank: int = 0,
                 barrier: Callable[[], None] | None = None, log: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier or (lambda: None)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    # ---- writing ----
    def save(self, step: int, files: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
        """Write this rank's ``files`` (name -> object for torch.save) as checkpoint ``step``.

        Every rank calls this with its own files; names must differ between ranks.
        """
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # the remains of a write that was killed
            tmp.mkdir()
        self.barrier()
        try:
            for name, obj in files.items():
                buf = io.BytesIO()
                torch.save(obj, buf)
                with open(tmp / name, "wb") as fh:
                    fh.write(buf.getbuffer())
                    fh.flush()
                    os.fsync(fh.fileno())
        except OSError as err:
            raise CheckpointError(f"writing checkpoint {final} failed ({err.strerror}); the previous "
                                  "checkpoint is intact; free disk space and resume with --resume") from None
        _fault_pause(step)
        self.barrier()
        if self.rank == 0:
            entries = {}
            for path in sorted(tmp.iterdir()):
                entries[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
            manifest = {"step": step, "files": entries, "meta": meta or {}}
            write_bytes_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step (e.g. after a rollback): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.finished()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # ---- reading ----
    def finished(self) -> list[Path]:
        """Finished checkpoint folders, oldest first (validity not checked)."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(dirs, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    @staticmethod
    def verify(path: Path) -> str | None:
        """None when the checkpoint is complete and intact, else what is wrong with it."""
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return f"{manifest_path} is missing (the write did not finish)"
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
        except (ValueError, KeyError, TypeError) as err:
            return f"{manifest_path} is unreadable ({err})"
        for name, entry in files.items():
            f = path / name
            if not f.is_file():
                return f"{f} is missing"
            size = f.stat().st_size
            if size != entry["bytes"]:
                return f"{f} is truncated or altered ({size} bytes, manifest says {entry['bytes']})"
            if _sha256(f) != entry["sha256"]:
                return f"{f} is corrupted (sha256 does not match the manifest)"
        return None

    def latest_valid(self) -> Path | None:
        """The newest intact checkpoint; corrupt ones are reported and skipped."""
        for path in reversed(self.finished()):
            problem = self.verify(path)
            if problem is None:
                return path
            self.log(f"checkpoint {path.name} is not usable: {problem}; falling back to an older one")
        return None

    @staticmethod
    def manifest(path: Path) -> dict[str, Any]:
        return json.loads((path / MANIFEST).read_text())

    @staticmethod
    def load(path: Path, name: str) -> Any:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing from the checkpoint; it was written by a run with "
                                  "another layout (world size?); resume with the same --nproc")
        # weights_only: the files hold tensors and plain containers only, never pickled code.
        return torch.load(f, map_location="cpu", weights_only=True)


# ---- optimizer state in the canonical (unpadded, all-experts, name-keyed) layout ----
def _expert_owner(model, name: str):
    """(Experts module, attribute) when ``name`` is a routed-expert weight, else None."""
    from anymoe.core.experts import Experts

    path, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return (module, attr) if isinstance(module, Experts) else None


def _unpad(module, attr: str, t: torch.Tensor) -> torch.Tensor:
    """The inverse of ``Experts.to_stored`` for any tensor shaped like the stored weight."""
    Fh, P = module.hidden, module.padded_hidden
    if P == Fh:
        return t
    if attr == "w13":
        return torch.cat([t[..., :Fh], t[..., P:P + Fh]], dim=-1).contiguous()
    if attr == "w2":
        return t[:, :Fh, :].contiguous()
    return t[..., :Fh].contiguous()


def canonical_optim_state(model, optimizer: torch.optim.Optimizer, ep_group=None) -> dict[str, Any]:
    """Optimizer state keyed by parameter name, expert moments unpadded and gathered over EP.

    torch keys optimizer state by parameter position and stores moments in the parameter's
    (padded, EP-local) shape; keyed by name, unpadded and holding every expert, it loads under
    any sizing policy and any EP size. Collective over ``ep_group`` when it has > 1 rank.
    """
    from anymoe.core.collectives import all_gather

    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    gather = ep_group is not None and ep_group.size > 1
    state: dict[str, Any] = {}
    for idx in sorted(sd["state"]):  # the same order on every rank: the gathers pair up
        p_state, p = sd["state"][idx], ordered[idx]
        name = names[id(p)]
        owner = _expert_owner(model, name)
        out = {}
        for k, v in p_state.items():
            if owner and torch.is_tensor(v) and v.shape == p.shape:
                v = _unpad(*owner, v)
                if gather:
                    v = all_gather(v.contiguous(), ep_group)
            out[k] = v
        state[name] = out
    groups = []
    for g in sd["param_groups"]:
        groups.append({**{k: v for k, v in g.items() if k != "params"},
                       "params": [names[id(ordered[i])] for i in g["params"]]})
    return {"format": "anymoe-canonical-1", "state": state, "param_groups": groups}


def _to_local(owner, v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A canonical (all experts, unpadded) moment -> this rank's stored layout."""
    module, attr = owner
    if v.shape[0] == module.num_experts and module.num_local != module.num_experts:
        v = v[module.local_offset:module.local_offset + module.num_local]
    if v.shape != p.shape:
        v = module.to_stored(attr, v)
    return v


def load_canonical_optim_state(model, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """The inverse of canonical_optim_state: this rank's experts, padded to this run's layout."""
    if saved.get("format") != "anymoe-canonical-1":
        raise CheckpointError("the optimizer file is not in anymoe's canonical format; it was not written "
                              "by `anymoe train`")
    params = dict(model.named_parameters())
    ordered = [p for g in optimizer.param_groups for p in g["params"]]
    index = {id(p): i for i, p in enumerate(ordered)}
    names = {id(p): n for n, p in params.items()}
    missing = [n for n in saved["state"] if n not in params]
    if missing:
        raise CheckpointError(f"optimizer state holds parameters this model lacks ({missing[:3]}...); "
                              "resume with the model config the checkpoint was written with")
    state = {}
    for name, p_state in saved["state"].items():
        p = params[name]
        owner = _expert_owner(model, name)
        state[index[id(p)]] = {
            k: (_to_local(owner, v, p) if owner and torch.is_tensor(v) and v.dim() == p.dim() else v)
            for k, v in p_state.items()}
    groups = []
    for g, live in zip(saved["param_groups"], optimizer.param_groups):
        live_names = [names[id(p)] for p in live["params"]]
        if live_names != g["params"]:
            raise CheckpointError("the optimizer's parameter groups differ from the checkpoint's; resume "
                                  "with the same model and optim config")
        groups.append({**{k: v for k, v in g.items() if k != "params"},
                       "params": [index[id(params[n])] for n in g["params"]]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


__all__ = ["CheckpointError", "CheckpointManager", "canonical_optim_state", "load_canonical_optim_state",
           "probe_writable", "step_dir_name", "write_bytes_atomic"]
