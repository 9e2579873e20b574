"""``train.compile``: regional torch.compile of the decoder blocks, optionally as CUDA graphs.

Regional compilation (torch.compile of each repeated block rather than of the whole model):
every block runs the same code on parameters that the tracer takes as graph inputs, so the
first block's graph serves all of them. Compile time is that of one block, whatever the depth,
and the embedding, head and loss stay eager (no graph around the data-dependent parts).

Modes (``COMPILE_MODES``):

- ``none``: eager.
- ``blocks``: each block through Inductor (norms, RoPE, router math and residual adds fused).
- ``blocks_cudagraphs``: the same with mode "reduce-overhead": each block's kernels are
  replayed as a CUDA graph, removing the launch gaps of a launch-bound step. CUDA graphs
  replay fixed shapes, so batches must all have one shape (data padded to ``data.seq_len``).
  Outputs of a graph live in memory the next replay overwrites: the trainer calls
  :func:`mark_step_begin` before every forward, copies what it keeps out at once, and with
  gradient accumulation copies the first micro-batch's gradients out (:func:`own_block_grads`).

What :func:`compile_blocks` does, in order:

1. every ``Experts`` module's grouped matmul becomes the backend's ``traceable_grouped_mm()``
   (one graph node: no host read of the expert counts, no dtype probe inside the graph);
2. dynamo's recompile limit is raised for this many blocks (dense and MoE blocks, train and
   eval, with and without grad are separate graphs of the one code object they share);
3. ``block.compile(...)`` in place: the module tree and its ``state_dict`` keys do not change
   (no ``_orig_mod.`` prefix), so checkpoints move between compiled and eager runs.

Measured (bench/results/gpu_h100/session2/train_throughput_h100_s2.json, 1.3B MoE, H100,
this function as the trainer calls it): 0.123 s per step eager, 0.081 s with
``blocks_cudagraphs``. On the CPU (bench/results/cpu_accel.json) the tiny
preset is 1.3x faster after a ~75 s compile, the small one not at all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from anymoe.core.config import ConfigError
from anymoe.core.experts import Experts

COMPILE_MODES = ("none", "blocks", "blocks_cudagraphs")  # and "auto": resolve_compile_mode
_INDUCTOR_MODE = {"blocks": None, "blocks_cudagraphs": "reduce-overhead"}
# Graphs one block code object may need: dense/MoE x train/eval x grad/no-grad, with room for
# one shape change (the short last eval batch).
_GRAPHS_PER_BLOCK = 8


def resolve_compile_mode(cfg: Any, backend: Any) -> str:
    """The mode a run uses: ``train.compile`` itself, or for "auto" the first of the backend's
    ``preferred_compile_modes()`` that it runs and this config allows (so one config file
    compiles where that pays and stays eager elsewhere)."""
    mode = cfg.train.compile
    if mode != "auto":
        return mode
    runs = set(backend.compile_modes())
    for candidate in backend.preferred_compile_modes():
        if candidate in runs and compile_refusal(cfg, candidate) is None:
            return candidate
    return "none"


def check_compile_config(cfg: Any) -> None:
    """Combinations of ``train.compile`` with the rest of a RunConfig that cannot work.

    Raises ConfigError naming ``train.compile`` and the fix. The backend's own answer (which
    modes it runs) is checked at build time by :func:`check_backend`; "auto" only picks modes
    this allows."""
    mode = cfg.train.compile
    if mode in ("none", "auto"):
        return
    why = compile_refusal(cfg, mode)
    if why is not None:
        raise ConfigError("train.compile", why)


def compile_refusal(cfg: Any, mode: str) -> str | None:
    """Why ``mode`` cannot run with this config (the error text, naming the fix), or None."""
    if mode == "none":
        return None
    if cfg.engine == "deepspeed":
        return (f"{mode!r} is not combined with engine: deepspeed (its engine wraps the model and hooks "
                "the parameters itself); set train.compile: none, or engine: native")
    if cfg.ep > 1:
        return (f"{mode!r} does not run with expert parallelism (parallel.ep = {cfg.ep}): the all-to-all "
                "dispatch reads its split sizes on the host inside every MoE block; set train.compile: "
                "none, or parallel.ep: 1")
    if mode != "blocks_cudagraphs":
        return None
    if cfg.model.checkpointing != "none":
        return (f"blocks_cudagraphs is not combined with model.checkpointing {cfg.model.checkpointing!r} "
                "(a recompute during backward would replay a forward graph whose outputs the backward "
                "still reads); use train.compile: blocks with checkpointing, or model.checkpointing: none")
    data = cfg.data
    why = None
    if data.format == "sft":
        why = "data.format sft pads each batch to its longest row"
    elif not data.packing:
        why = "data.packing false pads each batch to its longest document"
    if why is not None:
        return (f"blocks_cudagraphs replays fixed shapes, but {why}; use packed fixed-length rows "
                "(data.packing: true, format text/jsonl/synthetic) or train.compile: blocks")
    return None


def check_backend(mode: str, backend: Any) -> None:
    """Raise ConfigError unless ``backend`` runs ``mode`` (asked of the backend itself)."""
    modes = tuple(backend.compile_modes())
    if mode not in modes:
        raise ConfigError("train.compile", f"{mode!r} is not available on backend {backend.name!r}, which "
                          f"runs {', '.join(modes)}; set train.compile to one of those")


def raise_recompile_limit(n_blocks: int) -> None:
    """Let dynamo keep a graph per block variant instead of falling back to eager silently."""
    cfg = torch._dynamo.config
    need = _GRAPHS_PER_BLOCK * max(n_blocks, 1)
    # The newer name first; the older one stays as an alias on the torch versions that have both.
    for names, limit in ((("recompile_limit", "cache_size_limit"), need),
                         (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 2 * need)):
        name = next(n for n in names if hasattr(cfg, n))
        setattr(cfg, name, max(getattr(cfg, name), limit))


def compile_blocks(model: nn.Module, backend: Any, mode: str, compiler: str = "inductor") -> int:
    """Compile each of ``model.blocks`` in place for ``mode``; returns how many were compiled.

    ``compiler``: torch.compile's backend; tests pass "aot_eager" (the same tracing and
    autograd graphs, no code generation) to check the wiring in seconds. The CUDA-graph mode
    is an Inductor mode, so it needs "inductor"."""
    if mode not in COMPILE_MODES:
        raise ConfigError("train.compile", f"unknown mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if mode == "none":
        return 0
    if compiler != "inductor" and _INDUCTOR_MODE[mode] is not None:
        raise ValueError(f"train.compile {mode!r} is an Inductor mode; compiler {compiler!r} cannot run it")
    grouped_mm = backend.traceable_grouped_mm()
    for module in model.modules():  # every Experts, also one wrapped by LoRA (LoRAExperts.base)
        if isinstance(module, Experts):
            module.grouped_mm = grouped_mm
    blocks = list(model.blocks)
    raise_recompile_limit(len(blocks))
    for block in blocks:
        _compile_block(block, compiler, _INDUCTOR_MODE[mode])
    return len(blocks)


# What activation checkpointing recomputes, per model.checkpointing mode: these methods are
# compiled instead of the whole block, so the checkpoint call stays eager, outside any graph.
_RECOMPUTED = {"full": ("_forward",), "selective": ("_norm_attn", "_dense", "_moe")}


def _compile_block(block: nn.Module, compiler: str, inductor_mode: str | None) -> None:
    """The whole block in place; with activation checkpointing, the parts it recomputes.

    A checkpoint traced into the graph (dynamo's checkpoint operator) made Inductor fail on
    the H100 with torch 2.11 ("Argument 'routed_E' ... does not belong to this Graph",
    bench/results/gpu_h100/train_throughput_h100_s2.json); compiling what the checkpoint
    calls keeps it out of the graph and the same code object still serves every block.
    """
    parts = _RECOMPUTED.get(getattr(block, "checkpointing", "none"), ())
    if not parts:
        block.compile(backend=compiler, mode=inductor_mode)
        return
    for name in parts:
        if hasattr(block, name):
            setattr(block, name, torch.compile(getattr(block, name), backend=compiler, mode=inductor_mode))


def mark_step_begin(mode: str) -> None:
    """Before every forward under CUDA graphs: the previous forward's graph outputs may be
    overwritten from here on (the caller has copied what it keeps). No-op otherwise."""
    if mode == "blocks_cudagraphs":
        torch.compiler.cudagraph_mark_step_begin()


def own_block_grads(model: nn.Module, mode: str) -> None:
    """Under CUDA graphs, after the first micro-batch's backward when more follow in the step.

    A parameter without a gradient takes the incoming one as it is: its ``.grad`` becomes a
    backward graph's output, in memory the next replay overwrites, and the next micro-batch's
    gradient would land on it (wrong sums, silently in some torch versions: pytorch issues
    169545 and 96693). Copying the blocks' gradients out once makes the later micro-batches
    accumulate into memory the trainer owns. No-op without CUDA graphs."""
    if mode != "blocks_cudagraphs":
        return
    for p in model.blocks.parameters():
        if p.grad is not None:
            p.grad = p.grad.clone()


__all__ = ["COMPILE_MODES", "check_backend", "check_compile_config", "compile_blocks", "mark_step_begin",
           "own_block_grads", "raise_recompile_limit"]
