"""Pretraining and SFT of an MoE language model: the loop skeleton filled in.

One step (``train_step``), with G micro-batches per rank and D data-parallel ranks:

1. lr from the schedule (a pure function of the step);
2. the global count N of loss tokens in this step's global batch (labels != -100, summed over
   ranks), so the loss is the mean over all tokens whatever the split into ranks/micro-batches;
3. per micro-batch, under the backend's autocast: logits and MoE aux losses;
   backward of  CE_sum * D / N  +  aux / G  (gradients are then averaged over DP, which makes
   the first term sum_r CE_sum_r / N and the second the mean of the aux over all micro-batches:
   the same as one process with D x G micro-batches);
4. gradient sync (dense params over DP, expert params over the expert-data-parallel group);
5. global grad norm (expert shards summed over EP), a non-finite loss or norm skips the step;
6. clip, AdamW step, then the aux-free bias step of every MoE layer (DeepSeek-V3).

Nothing is read to the host between micro-batches: the loss, aux and routing statistics stay on
the device (anymoe.trainers.step_stats) and come back with the squared gradient norms in one
transfer after the backward passes, so the device never waits on the host mid-step.
Where the optimizer takes a device coefficient (anymoe.trainers.optim.takes_device_coef), 5 and
the clip coefficient of 6 are also computed on the device and the AdamW step is queued before
that read: the device runs it right after the backward instead of idling while the host reads
and decides, and skips it itself on a bad step (the host then takes back the step counts).
The norm is taken after the gradient all-reduce and the loss is summed over DP on the device (in
both flows, the same float64 additions), so every rank decides the same, and no host collective
after the read waits for the queued step.
``train.compile`` compiles the decoder blocks first (anymoe.trainers.compile).

Weights are drawn on the CPU from the seed before moving to the device, and the data order
depends only on the seed, so every backend and world size sees the same run.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anymoe.core.config import ConfigError, to_dict
from anymoe.core.losses import cross_entropy_sum
from anymoe.trainers.checkpoint import canonical_optim_state, load_canonical_optim_state, write_bytes_atomic
from anymoe.trainers.compile import (
    check_backend,
    compile_blocks,
    mark_step_begin,
    own_block_grads,
    resolve_compile_mode,
)
from anymoe.trainers.config import RunConfig
from anymoe.trainers.distributed import DistEnv
from anymoe.trainers.loop import LoopSettings, StepOutput, Trainer
from anymoe.trainers.metrics import load_stats
from anymoe.trainers.optim import (
    LRSchedule,
    build_optimized,
    clipped_step,
    device_grad_coef,
    takes_device_coef,
)
from anymoe.trainers.profiling import StepProfiler, phase, step_profiler
from anymoe.trainers.step_stats import MicroBatchStats, StepStats
from anymoe.trainers.transfer import to_device

IGNORE = -100


class TrainData:
    """This rank's micro-batches, step by step, from anymoe.data's seeded global order.

    The global batch of a step is micro_batch x accum x dp rows; this rank gets its
    contiguous share (anymoe.data.sampler) and cuts it into ``accum`` micro-batches, so the
    micro-batches of a DP=N run are exactly those of a DP=1 run with N x accum of them.
    """

    def __init__(self, cfg, micro_batch: int, accum: int, dp_rank: int, dp_size: int,
                 eval_batches: int) -> None:
        from anymoe.data import build_data

        self.micro_batch, self.accum = micro_batch, accum
        self.dp_rank, self.dp_size, self.n_eval = dp_rank, dp_size, eval_batches
        self.bundle = build_data(cfg)
        self.tokenizer = self.bundle.tokenizer
        self.vocab_size = self.tokenizer.vocab_size
        self.stream = self.bundle.train_stream(micro_batch * accum * dp_size, dp_rank, dp_size)

    def next_step(self) -> list[tuple[Tensor, Tensor]]:
        """This rank's ``accum`` micro-batches (input_ids, labels) of the next global batch."""
        batch = self.stream.next_batch()
        mb = self.micro_batch
        return [(batch["input_ids"][i * mb:(i + 1) * mb], batch["labels"][i * mb:(i + 1) * mb])
                for i in range(self.accum)]

    def eval_batches(self) -> list[tuple[Tensor, Tensor]]:
        """``eval.batches`` global batches (the training global batch, so the rows evaluated do
        not depend on the world size), this rank's share cut into micro-batches."""
        out = []
        mb, global_batch = self.micro_batch, self.micro_batch * self.accum * self.dp_size
        for n, batch in enumerate(self.bundle.eval_batches(global_batch, self.dp_rank, self.dp_size)):
            if n >= self.n_eval:
                break
            ids, labels = batch["input_ids"], batch["labels"]
            out += [(ids[i:i + mb], labels[i:i + mb]) for i in range(0, ids.shape[0], mb)]
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def _changed_settings(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two plain config trees, 'path old -> new'."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _changed_settings(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')} {old!r} -> {new!r}"]


def loop_settings(cfg: RunConfig, resume: bool) -> LoopSettings:
    return LoopSettings(
        total_steps=cfg.train.steps, log_every=cfg.logging.every, checkpoint_every=cfg.checkpoint.every,
        keep_last=cfg.checkpoint.keep_last, checkpoint_at_end=cfg.checkpoint.at_end,
        eval_every=cfg.eval.every, eval_at_end=cfg.eval.at_end, max_bad_steps=cfg.train.max_bad_steps,
        spike_factor=cfg.train.spike_factor, spike_window=cfg.train.spike_window,
        max_rollbacks=cfg.train.max_rollbacks, resume=resume, tensorboard=cfg.logging.tensorboard,
        progress=cfg.logging.progress)


def precision_label(cfg: RunConfig, backend) -> str:
    """What a run computes in, for its log line and run.json: bf16_master, bfloat16 (autocast) or fp32."""
    if cfg.train.precision == "bf16_master":
        return "bf16_master"
    return str(resolve_precision(cfg, backend) or "fp32").replace("torch.", "")


def resolve_precision(cfg: RunConfig, backend) -> torch.dtype | None:
    """The autocast dtype: None = fp32 (or no autocast: ``bf16_master`` runs the model in bf16).
    ``auto`` asks the backend."""
    if cfg.train.precision in ("fp32", "bf16_master"):
        return None
    if cfg.train.precision == "bf16":
        return torch.bfloat16
    return backend.autocast_dtype()


class PretrainTrainer(Trainer):
    """Next-token prediction on packed text (pretraining) or prompt-masked responses (SFT)."""

    # torch.compile backend of ``train.compile``; tests set "aot_eager" (same graphs, no codegen).
    _compiler = "inductor"

    def __init__(self, cfg: RunConfig, run_dir: str | Path, backend, dist: DistEnv | None = None,
                 resume: bool = False, groups: Any = None) -> None:
        super().__init__(run_dir, loop_settings(cfg, resume), dist)
        self.cfg = cfg
        self.backend = backend
        self.device_type = backend.device_type
        self.groups = groups
        # Fault injection for the reliability tests: ANYMOE_FAULT_NAN_STEPS="3,4" (0-based steps).
        spec = os.environ.get("ANYMOE_FAULT_NAN_STEPS", "")
        self._poison_steps = {int(x) for x in spec.split(",") if x.strip()}

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        cfg, backend = self.cfg, self.backend
        from anymoe.models.transformer import MoETransformer

        self.device = backend.device(self.dist.local_rank)
        self.compile_mode = resolve_compile_mode(cfg, backend)  # "auto": the backend's pick
        check_backend(self.compile_mode, backend)  # before any work: the backend says what it runs
        if cfg.train.host_threads is not None and "OMP_NUM_THREADS" not in os.environ:
            # Small models: one thread per process beats two on a shared 2-core host by 15x
            # (OMP barriers spin); see bench/results/cpu_precision.json (threads).
            torch.set_num_threads(cfg.train.host_threads)
        backend.set_deterministic(cfg.train.deterministic)
        self.amp_dtype = resolve_precision(cfg, backend)
        # bf16_master: bf16 weights (no autocast, no per-step weight casts), fp32 masters in the optimizer
        self.param_dtype = torch.bfloat16 if cfg.train.precision == "bf16_master" else None
        self.dp_size = self.groups.dp.size if self.groups is not None else 1
        self.dp_rank = self.groups.dp.rank if self.groups is not None else 0
        self.accum = cfg.train.accumulation(self.dp_size)
        self.data = TrainData(cfg.data, micro_batch=cfg.train.micro_batch, accum=self.accum,
                              dp_rank=self.dp_rank, dp_size=self.dp_size, eval_batches=cfg.eval.batches)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ConfigError("model.vocab_size", f"({cfg.model.vocab_size}) is smaller than the tokenizer's "
                              f"vocabulary ({self.data.vocab_size}); set model.vocab_size >= "
                              f"{self.data.vocab_size}")
        # Weights from the seed, on the CPU, then moved: every backend starts bit-identical.
        torch.manual_seed(cfg.train.seed)
        self.model = MoETransformer(cfg.model, backend=backend, parallel=self.groups).to(self.device)
        if self.groups is not None:
            from anymoe.core.parallel import attach_groups

            attach_groups(self.model, self.groups)
        self.finetune_summary = self._apply_finetune()  # before the optimizer: it takes what still trains
        self.distiller = self._build_distiller()
        # In place, after fine-tuning has shaped the model: parameters and state_dict keys unchanged.
        compile_blocks(self.model, backend, self.compile_mode, self._compiler)
        self.model, self.optimizer = build_optimized(self.model, cfg.optim, backend,
                                                     master_weights=self.param_dtype is not None)
        if self.param_dtype is not None:
            self.optimizer.init_master_weights()  # from the fp32 weights, then the model goes bf16
            with torch.no_grad():
                for p in self.model.parameters():
                    p.data = p.data.to(self.param_dtype)
        self.schedule = LRSchedule(cfg.optim, cfg.train.steps)
        backend.manual_seed(cfg.train.seed + 1 + self.dist.rank)  # dropout streams, distinct per rank
        self.tokens_per_step = cfg.train.micro_batch * self.accum * self.dp_size * cfg.data.seq_len
        self.flops_per_token = self._flops_per_token()
        if self.dist.is_main:
            params, active = self.model.num_parameters(), self.model.num_parameters(active=True)
            dtype = precision_label(cfg, backend)
            if self.compile_mode != "none":
                dtype += f", compile {self.compile_mode}"
            ep = self.groups.ep.size if self.groups is not None else 1
            self.message(f"backend {backend.name} ({dtype}), {self.dist.world_size} process(es) "
                         f"(dp {self.dp_size // ep} x ep {ep}), {params / 1e6:.2f}M parameters "
                         f"({active / 1e6:.2f}M active), {self.tokens_per_step} tokens/step "
                         f"({cfg.train.micro_batch} x {self.accum} micro-batches x {self.dp_size} ranks)")
        self._preflight()

    def _preflight(self) -> None:
        """A checkpoint must fit on the disk: check now (probe file), not at the first save."""
        from anymoe.trainers.checkpoint import probe_writable

        if self.dist.is_main:
            n = sum(p.numel() * p.element_size() for p in self.model.parameters())
            probe_writable(self.run_dir / "checkpoints", need_bytes=3 * n + (1 << 20))

    def _flops_per_token(self) -> float:
        """6 x active parameters + attention (12 L d S): the PaLM appendix-B estimate."""
        m = self.cfg.model
        attention = 12.0 * m.n_layers * m.d_model * self.cfg.data.seq_len
        return 6.0 * self.model.num_parameters(active=True) + attention

    def derived_metrics(self, row: dict[str, Any]) -> dict[str, Any]:
        """MFU = achieved FLOP/s / (peak FLOP/s x ranks); null where the backend has no peak."""
        dtype = self.amp_dtype or self.param_dtype or torch.float32
        peak = self.backend.peak_flops(dtype) * self.dist.world_size
        mfu = row["tokens_per_s"] * self.flops_per_token / peak if peak > 0 else None
        return {"mfu": mfu, "memory": self.backend.memory_stats()}

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ step
    def _expert_param(self, name: str) -> bool:
        return ".ffn.experts." in name

    def train_step(self, step: int) -> StepOutput:
        lr = self.schedule.apply(self.optimizer, step)
        with phase("data"):
            host_batches = self.data.next_step()
            n_local = sum(int((labels != IGNORE).sum()) for _, labels in host_batches)  # host copies: no sync
            batches = [(to_device(ids, self.device), to_device(labels, self.device))
                       for ids, labels in host_batches]
            # The global token count stays on the device (a fill, then the DP sum): a host read here
            # would wait for the previous step's queued optimizer before the forward is issued.
            n_tokens_t = self._dp_sum(torch.full((), float(n_local), dtype=torch.float64,
                                                 device=self.device))
        scale = self.dp_size / n_tokens_t.clamp_min(1.0)  # float64, as a Python float was
        stats = MicroBatchStats(self.accum)
        for i, (ids, labels) in enumerate(batches):
            mark_step_begin(self.compile_mode)
            with phase("forward"):
                with self._autocast():
                    out = self.model(ids, return_aux=True)
                ce = cross_entropy_sum(out.logits.view(-1, out.logits.shape[-1]), labels.view(-1), IGNORE)
                if step in self._poison_steps:  # fault injection (tests): a non-finite loss and gradient
                    ce = ce * float("nan")
                stats.add(ce, out)  # on the device, copied before any graph replay can overwrite it
                lm = ce if self.distiller is None else self.distiller.mix(ce, ids, labels, out.logits)
                # lm times a Python float multiplied in lm's dtype (fp32), the float rounded to it
                loss = lm * scale.to(lm.dtype) + out.aux_loss / self.accum
            with phase("backward"):
                loss.backward()
                if i == 0 and len(batches) > 1:
                    own_block_grads(self.model, self.compile_mode)  # out of the graph pool before a replay
        with phase("grad_sync_norm"):
            self._sync_grads()
            squares = self._grad_norm_squares()
        ce_sum = self._dp_sum(stats.ce_sum_on_device())  # the step's CE over all ranks, on the device
        pending = stats.fetch_later((*squares, ce_sum, n_tokens_t), reduce=self._dp_sum)  # rows: all ranks
        queued = takes_device_coef(self.optimizer)
        if queued:  # the AdamW step before the read, deciding on the device (module docstring)
            with phase("optimizer"):
                self.optimizer.step(grad_coef=device_grad_coef(*squares, ce_sum, self.cfg.optim.grad_clip))
        with phase("host_read"):
            host = pending()  # the step's one host read; it does not wait for a queued step
        ce_total, n_tokens = host.extra[2], host.extra[3]
        loss_value = ce_total / max(n_tokens, 1.0)
        grad_norm = math.sqrt(host.extra[0] + host.extra[1])
        bad = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
        if bad:
            if queued:  # the device skipped it (a NaN coef); the host's step counts go back
                self.optimizer.undo_step()
            self.optimizer.zero_grad(set_to_none=True)
            self._drop_bias_loads()
            why = "loss" if not math.isfinite(loss_value) else "gradient norm"
            return StepOutput(loss=loss_value, tokens=int(n_tokens), skipped=True,
                              reason=f"non-finite {why}", metrics={"lr": lr, "grad_norm": grad_norm})
        if not queued:
            clip = self.cfg.optim.grad_clip
            coef = clip / (grad_norm + 1e-6) if clip > 0 and grad_norm > clip else 1.0
            with phase("optimizer"):
                clipped_step(self.optimizer, self.model.parameters(), coef)
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_router_biases()
        with phase("statistics"):
            read = host.summarize()  # the per-layer host sums, while the device runs the optimizer
        metrics: dict[str, Any] = {"lr": lr, "grad_norm": grad_norm, **self._rank_mean_metrics(read)}
        if self.distiller is not None:  # the KD term per loss token (before alpha), all ranks
            kd = self._dp_sum(torch.tensor([self.distiller.take_kl()], dtype=torch.float64)).item()
            metrics["distill/kd"] = kd / max(n_tokens, 1.0)
        return StepOutput(loss=loss_value, tokens=int(n_tokens), metrics=metrics)

    def _rank_mean_metrics(self, read: StepStats) -> dict[str, Any]:
        """aux loss, each balance loss and router entropy as means over the DP ranks, loads and dropped
        pairs summed over them, from sums that are already over every rank's rows."""
        n = self.dp_size
        metrics: dict[str, Any] = {"aux_loss": read.aux_total / n,
                                   **{f"aux/{k}": v / n for k, v in read.aux_sums.items()}}
        if read.layer_loads is not None:
            metrics["layers"] = [{**load_stats(load), "entropy": more["entropy"] / n,
                                  "dropped": more["dropped"]}
                                 for load, more in zip(read.layer_loads, read.layer_extra)]
        return metrics

    def _dp_sum(self, t: Tensor) -> Tensor:
        if self.groups is None or self.groups.dp.size == 1:
            return t
        from anymoe.core.collectives import all_reduce_

        return all_reduce_(t, self.groups.dp, "sum")

    def _sync_grads(self) -> None:
        if self.groups is not None:
            from anymoe.core.parallel import sync_gradients

            sync_gradients(self.model, self.groups)

    def _grad_norm_squares(self) -> tuple[Tensor, Tensor]:
        """Squared gradient norms (dense, expert; float64 device scalars, experts summed over
        EP), left on the device for the step's one host read."""
        grads: tuple[list[Tensor], list[Tensor]] = ([], [])
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                grads[self._expert_param(name)].append(p.grad.detach())
        # Multi-tensor norms (a few launches on CUDA, read once, no float64 copy of 1.3B
        # gradients), squared and summed in float64.
        dense, expert = (torch.stack(torch._foreach_norm(g, 2.0, dtype=torch.float64)).square().sum() if g
                         else torch.zeros((), dtype=torch.float64, device=self.device) for g in grads)
        if self.groups is not None and self.groups.ep.size > 1:
            from anymoe.core.collectives import all_reduce_

            expert = all_reduce_(expert, self.groups.ep, "sum")
        return dense, expert

    def _drop_bias_loads(self) -> None:
        """A skipped step must not move the aux-free biases: forget its routing loads."""
        for layer in self.model.moe_layers():
            accum = getattr(layer.router, "load_accum", None)
            if accum is not None:
                accum.zero_()

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        batches = self.data.eval_batches()
        if not batches:
            return {}
        self.model.eval()
        ce = torch.zeros(2, dtype=torch.float64)
        for ids, labels in batches:
            ids, labels = ids.to(self.device), labels.to(self.device)
            mark_step_begin(self.compile_mode)
            with self._autocast():
                logits = self.model(ids)
            ce[0] += float(cross_entropy_sum(logits.view(-1, logits.shape[-1]), labels.view(-1), IGNORE))
            ce[1] += float((labels != IGNORE).sum())
        self.model.train()
        ce = self._dp_sum(ce)
        loss = float(ce[0] / max(ce[1].item(), 1.0))
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_files(self) -> dict[str, Any]:
        """One canonical model and optimizer file (all experts, unpadded), written by rank 0.

        Under EP the expert shards are gathered first (collective over the EP group), so the
        checkpoint resumes under any EP size, world size, backend and sizing policy."""
        ep = self.groups.ep if self.groups is not None else None
        if ep is not None and ep.size > 1:
            from anymoe.core.parallel import full_state_dict

            model_state = full_state_dict(self.model, self.groups)
        else:
            model_state = self.model.state_dict()
        optim_state = canonical_optim_state(self.model, self.optimizer, ep)
        if not self.dist.is_main:
            return {}
        return {"model.pt": model_state, "optim.pt": optim_state}

    def load_checkpoint(self, path: Path, restore_data: bool = True) -> None:
        saved_cfg = self.ckpt.manifest(path).get("meta", {}).get("config")
        if restore_data and saved_cfg is not None:
            changed = _changed_settings(saved_cfg, to_dict(self.cfg))
            if changed:
                self.message("resuming with changed settings: " + "; ".join(changed[:8]))
        state = self.ckpt.load(path, "model.pt")
        if self.groups is not None and self.groups.ep.size > 1:
            from anymoe.core.parallel import local_state_dict

            state = local_state_dict(state, self.model, self.groups)
        self.model.load_state_dict(state)
        load_canonical_optim_state(self.model, self.optimizer, self.ckpt.load(path, "optim.pt"))

    def make_profiler(self) -> StepProfiler | None:
        return step_profiler(self.cfg.profile, self.backend, self.run_dir, self.dist.rank, self.step,
                             self.message)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"config": to_dict(self.cfg), "ep": self.groups.ep.size if self.groups is not None else 1}

    def data_state(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.data.load_state_dict(state)

    # ------------------------------------------------------------------ end of run
    def finish(self) -> None:
        if self.cfg.checkpoint.export_hf:  # every rank: the expert gather under EP is collective
            self.export_hf(self.run_dir / "hf")
        if not self.dist.is_main:
            return
        if self.cfg.logging.plots:
            try:
                from anymoe.trainers.plots import write_plots

                write_plots(self.run_dir)
            except (ImportError, ValueError, OSError) as err:
                print(f"plots not written: {err}", file=sys.stderr)

    def export_hf(self, out: Path) -> None:
        from anymoe.models import hf
        from anymoe.trainers.finetune import export_model

        # LoRA adapters merged into a copy; model.cfg, not cfg.model: expansion may have grown it.
        hf.save_pretrained(export_model(self.model), self.model.cfg, out)
        if self.dist.is_main:
            write_bytes_atomic(out / "anymoe_step.txt", f"{self.step}\n".encode())
            self.message(f"Hugging Face model written to {out}")

    # ------------------------------------------------------------------ fine-tuning, distillation
    def _apply_finetune(self) -> dict[str, Any] | None:
        """finetune section: initial weights, expert growth, which parameters train."""
        ft = self.cfg.finetune
        if not ft.active:
            return None
        from anymoe.trainers.finetune import apply_finetune, load_initial_weights

        if ft.init_from is not None:
            source = load_initial_weights(self.model, ft.init_from)
            self.message(f"finetune: weights from {source}")
        summary = apply_finetune(self.model, ft, seed=self.cfg.train.seed)
        self.message(f"finetune: mode {summary['mode']}, {summary['trainable'] / 1e6:.3f}M of "
                     f"{summary['total'] / 1e6:.3f}M parameters train")
        return summary

    def _build_distiller(self):
        if self.cfg.distill is None:
            return None
        from anymoe.trainers.distill import Distiller

        distiller = Distiller.from_config(self.cfg.distill, self.device, self.cfg.model.vocab_size)
        self.message(f"distill: teacher {self.cfg.distill.teacher}, T {self.cfg.distill.temperature}, "
                     f"alpha {self.cfg.distill.alpha}")
        return distiller


__all__ = ["IGNORE", "PretrainTrainer", "loop_settings", "precision_label", "resolve_precision"]
