"""Can a ModelConfig be written as a given Hugging Face architecture? One ConfigError if not.

Each architecture computes one fixed function; an anymoe option that changes the function
and has no counterpart there (sandwich norm, hash routing, a shared expert Mixtral lacks)
must stop the export with the field named, instead of writing a checkpoint that silently
computes something else.
"""

from __future__ import annotations

from anymoe.core.config import ConfigError
from anymoe.models.config import ModelConfig


def _fail(field: str, arch: str, why: str) -> None:
    raise ConfigError(f"model.{field}", f"cannot be written as Hugging Face {arch!r}: {why}")


def check_exportable(
    cfg: ModelConfig,
    arch: str,
    *,
    attention: str,
    qk_norm: bool,
    attention_bias: tuple[str, ...],
    score: str,
    normalize: bool | None,
    shared: bool | str,
    first_dense: bool,
    router_kinds: tuple[str, ...] = ("topk",),
    scaling: bool = False,
) -> None:
    """Raise ConfigError naming the first field ``arch`` cannot express.

    normalize: True / False = required value of router.normalize_topk, None = either.
    shared: False = none allowed, "gated" = exactly a sigmoid-gated shared MLP, "plain" = ungated.
    """
    if cfg.moe is None:
        _fail("moe", arch, "a dense model (moe: null); export it as llama or qwen2, or upcycle it first")
    m, r = cfg.moe, cfg.moe.router
    if cfg.sandwich_norm:
        _fail("sandwich_norm", arch, "the extra post-sublayer norms have no counterpart there")
    if cfg.attention != attention:
        _fail("attention", arch, f"it uses {attention} attention")
    if cfg.attention == "gqa" and cfg.qk_norm != qk_norm:
        _fail("qk_norm", arch, f"it {'always' if qk_norm else 'never'} normalises queries and keys")
    if cfg.attention_bias not in attention_bias:
        _fail("attention_bias", arch, f"its attention biases are {' or '.join(attention_bias)}")
    if cfg.first_dense_layers and not first_dense:
        _fail("first_dense_layers", arch, "it has no dense layers")
    if r.kind not in router_kinds:
        _fail("moe.router.kind", arch, f"its router is {' or '.join(router_kinds)}")
    if r.score != score:
        _fail("moe.router.score", arch, f"it scores experts with {score}")
    renorm = r.normalize_topk or (score == "softmax" and not r.softmax_before_topk)
    if normalize is not None and renorm != normalize:
        _fail("moe.router.normalize_topk", arch, f"it {'always' if normalize else 'never'} renormalises")
    if normalize is None and score == "softmax" and not r.softmax_before_topk and not r.normalize_topk:
        pass  # softmax over the K logits == renormalised top-K: expressible with norm_topk_prob
    if r.scaling != 1.0 and not scaling:
        _fail("moe.router.scaling", arch, "it has no routed scaling factor; use 1.0")
    if m.balance.aux_free and not scaling:  # only DeepSeek-V3 (the one with scaling) has the bias
        _fail("moe.balance.aux_free", arch, "it has no expert selection bias")
    if shared is False and m.shared_experts:
        _fail("moe.shared_experts", arch, "it has no shared experts")
    if shared == "gated" and (m.shared_experts != 1 or not m.shared_gate):
        _fail(
            "moe.shared_gate" if m.shared_experts else "moe.shared_experts",
            arch,
            "it has exactly one shared expert behind a sigmoid gate",
        )
    if shared == "plain" and (m.shared_experts < 1 or m.shared_gate):
        _fail("moe.shared_experts", arch, "it has >= 1 ungated shared experts")
    if shared == "plain" and m.shared_hidden not in (None, m.expert_hidden):
        _fail("moe.shared_hidden", arch, "its shared experts have the routed experts' hidden size")


__all__ = ["check_exportable"]
