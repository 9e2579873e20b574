"""The pretrain/SFT trainer on DeepSpeed's engine (``engine: deepspeed``).

Everything but the update is PretrainTrainer's (model, data order, loss, lr schedule, eval,
metrics, run layout); the step differs in four named places:

1. ``engine.backward(loss, scale_wrt_gas=False)``: the loss is already scaled as in the native
   loop (CE_sum x D / N + aux / G), so DeepSpeed must not divide by the accumulation steps again;
2. ``engine.step()`` after every micro-batch (DeepSpeed counts micro-steps and updates at the
   accumulation boundary: gradient reduction over DP / EDP, clipping, AdamW);
3. the grad norm is the one DeepSpeed clipped with (``engine.get_global_grad_norm()``);
4. checkpoints hold the canonical model (model.pt, loadable by any layout) plus each rank's
   ZeRO shard (``zero_rankNNNNN.pt``: fp32 master partitions and AdamW moments), so resuming
   under DeepSpeed needs the same world size, EP size and ZeRO stage.

A non-finite loss stops the run before the update (DeepSpeed has no skip for bf16/fp32
steps; the newest checkpoint stays the last good state).
"""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Any

import torch

from anymoe.core.losses import cross_entropy_sum
from anymoe.trainers.checkpoint import CheckpointError
from anymoe.trainers.loop import StepOutput, TrainingStopped
from anymoe.trainers.pretrain import IGNORE, PretrainTrainer
from anymoe.trainers.step_stats import MicroBatchStats

# ZeRO optimizer state keys that are plain data (tensors, numbers, lists, dicts, strings); the
# rest (a loss-scaler object) is rebuilt by DeepSpeed from the config and not saved.
_PLAIN = (torch.Tensor, int, float, str, bool, list, tuple, dict, type(None))


def _plain(obj: Any) -> bool:
    if isinstance(obj, dict):
        return all(_plain(k) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return isinstance(obj, _PLAIN)


def _to_plain(obj: Any) -> Any:
    """Enums (DeepSpeed's ZeroStageEnum is an int enum) -> their values, so the file loads
    with ``weights_only=True``."""
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {_to_plain(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(v) for v in obj)
    return obj


class DeepSpeedPretrainTrainer(PretrainTrainer):
    """PretrainTrainer whose update is DeepSpeed ZeRO's (see the module docstring)."""

    def build(self) -> None:
        from anymoe.trainers.deepspeed_engine import build_engine

        super().build()
        cfg = self.cfg
        self.engine, self.ds_config = build_engine(
            self.model, self.groups, cfg.deepspeed, cfg.optim, self.backend, cfg.train.micro_batch,
            self.accum, bf16=self.amp_dtype == torch.bfloat16)
        self.optimizer = self.engine.optimizer  # the ZeRO optimizer: lr schedule and state go through it
        if self.dist.is_main:
            zero = self.ds_config["zero_optimization"]["stage"]
            self.message(f"engine: deepspeed ZeRO-{zero}, bf16 {self.ds_config['bf16']['enabled']}, "
                         f"{self.accum} accumulation step(s)")

    def _autocast(self):
        import contextlib

        return contextlib.nullcontext()  # DeepSpeed casts the weights itself under bf16

    def train_step(self, step: int) -> StepOutput:
        eng = self.engine
        lr = self.schedule.apply(eng.optimizer, step)
        batches = [(ids.to(self.device), labels.to(self.device)) for ids, labels in self.data.next_step()]
        n_local = sum(int((labels != IGNORE).sum()) for _, labels in batches)
        n_tokens = self._dp_sum(torch.tensor([float(n_local)], dtype=torch.float64)).item()
        scale = self.dp_size / max(n_tokens, 1.0)
        stats = MicroBatchStats(self.accum)  # on the device; one host read after the micro-batches
        distiller = getattr(self, "distiller", None)
        for i, (ids, labels) in enumerate(batches):
            out = eng(ids, return_aux=True)
            ce = cross_entropy_sum(out.logits.view(-1, out.logits.shape[-1]), labels.view(-1), IGNORE)
            stats.add(ce, out)
            lm = ce if distiller is None else distiller.mix(ce, ids, labels, out.logits)
            eng.backward(lm * scale + out.aux_loss / self.accum, scale_wrt_gas=False)
            if i < len(batches) - 1:
                eng.step()  # not a boundary: DeepSpeed only counts the micro-step
        read = stats.read(reduce=self._dp_sum)  # every rank's rows, summed on the device
        loss_value = read.ce_sum.item() / max(n_tokens, 1.0)
        if not math.isfinite(loss_value):
            raise TrainingStopped(f"non-finite loss at step {step + 1} under engine: deepspeed (it cannot "
                                  "skip a step); the newest checkpoint is the last good state; lower "
                                  "optim.lr and --resume")
        eng.step()  # the boundary: reduce, clip, AdamW
        norm = eng.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        self.model.update_router_biases()
        metrics: dict[str, Any] = {"lr": lr, "grad_norm": grad_norm, **self._rank_mean_metrics(read)}
        if distiller is not None:
            kl = self._dp_sum(torch.tensor([distiller.take_kl()], dtype=torch.float64)).item()
            metrics["distill/kd"] = kl / max(n_tokens, 1.0)
        return StepOutput(loss=loss_value, tokens=int(n_tokens), metrics=metrics)

    # ------------------------------------------------------------------ checkpoints
    def _zero_file(self) -> str:
        return f"zero_rank{self.dist.rank:05d}.pt"

    def checkpoint_files(self) -> dict[str, Any]:
        ep = self.groups.ep if self.groups is not None else None
        if ep is not None and ep.size > 1:
            from anymoe.core.parallel import full_state_dict

            model_state = full_state_dict(self.model, self.groups)
        else:
            model_state = self.model.state_dict()
        zero = {k: _to_plain(v) for k, v in self.engine.optimizer.state_dict().items() if _plain(v)}
        files: dict[str, Any] = {self._zero_file(): zero}
        if self.dist.is_main:
            files["model.pt"] = model_state
        return files

    def load_checkpoint(self, path: Path, restore_data: bool = True) -> None:
        state = self.ckpt.load(path, "model.pt")
        if self.groups is not None and self.groups.ep.size > 1:
            from anymoe.core.parallel import local_state_dict

            state = local_state_dict(state, self.model, self.groups)
        self.model.load_state_dict(state)
        # DeepSpeed merges the shards of every data-parallel rank (global rank order) itself.
        names = [f"zero_rank{r:05d}.pt" for r in range(self.dist.world_size)]
        missing = [n for n in names if not (path / n).is_file()]
        extra = (path / f"zero_rank{self.dist.world_size:05d}.pt").is_file()
        if missing or extra:
            raise CheckpointError(f"{path} does not hold the ZeRO shards of {self.dist.world_size} ranks "
                                  "(written by another engine or world size); resume with the same --nproc, "
                                  "parallel.ep and engine, or start a new run from its model.pt "
                                  "(finetune.init_from)")
        shards = [self.ckpt.load(path, n) for n in names]
        self.engine.optimizer.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=True)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**super().checkpoint_meta(), "engine": "deepspeed",
                "zero_stage": self.ds_config["zero_optimization"]["stage"]}


__all__ = ["DeepSpeedPretrainTrainer"]
