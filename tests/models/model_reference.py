"""A plain float64 reference of the MoE decoder, written from the equations with loops.

It reads the model's canonical state dict and recomputes the logits token by token, head
by head and expert by expert, so the fast path (SDPA, stacked grouped matmul, dispatch) is
checked against code that shares nothing with it but the parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from anymoe.models.config import ModelConfig


def rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def rope_vec(x, pos, theta, interleave=False):
    """Rotate one head vector x [Dh] at position pos (pairs (i, i + Dh/2), or (2i, 2i+1) interleaved)."""
    Dh = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(Dh // 2):
        ang = pos * theta ** (-2.0 * i / Dh)
        c, s = math.cos(ang), math.sin(ang)
        a, b = (2 * i, 2 * i + 1) if interleave else (i, i + Dh // 2)
        out[a] = x[a] * c - x[b] * s
        out[b] = x[b] * c + x[a] * s
    return out


def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def route(x, p, cfg: ModelConfig):
    """Top-k choice and weights of one token (softmax or sigmoid, group-limited, aux-free bias)."""
    m, r = cfg.moe, cfg.moe.router
    logits = p["router.weight"] @ x
    scores = torch.softmax(logits, -1) if r.score == "softmax" else torch.sigmoid(logits)
    sel = scores.clone()
    if m.balance.aux_free:
        sel = sel + p["router.expert_bias"]
    if r.kind == "group_limited":
        per = m.num_experts // r.n_groups
        gs = [(sel[g * per:(g + 1) * per].topk(2).values.sum() if r.group_score == "top2_sum"
               else sel[g * per:(g + 1) * per].max()) for g in range(r.n_groups)]
        keep = torch.stack(gs).detach().topk(r.topk_groups).indices.tolist()
        sel = torch.stack([sel[e] if e // per in keep else torch.tensor(-math.inf, dtype=sel.dtype)
                           for e in range(m.num_experts)])
    ids = sel.topk(m.top_k).indices
    w = scores[ids]
    if r.normalize_topk:
        w = w / w.sum()
    return ids, w * r.scaling


def _gqa_qkv(h, p, cfg, pos):
    """Per token, per query head: roped query, roped key and value of its KV group (lists of lists)."""
    S, H, G, Dh = h.shape[0], cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    q = h @ p["attn.q_proj.weight"].t()
    k = h @ p["attn.k_proj.weight"].t()
    v = h @ p["attn.v_proj.weight"].t()
    if "attn.q_proj.bias" in p:
        q, k, v = q + p["attn.q_proj.bias"], k + p["attn.k_proj.bias"], v + p["attn.v_proj.bias"]
    qs, ks, vs = [], [], []
    for s in range(S):
        qh, kh, vh = [], [], []
        for hh in range(H):
            g = hh // (H // G)
            qv, kv = q[s, hh * Dh:(hh + 1) * Dh], k[s, g * Dh:(g + 1) * Dh]
            if cfg.qk_norm:
                qv = rms(qv, p["attn.q_norm.weight"], cfg.norm_eps)
                kv = rms(kv, p["attn.k_norm.weight"], cfg.norm_eps)
            qh.append(rope_vec(qv, pos[s], cfg.rope_theta))
            kh.append(rope_vec(kv, pos[s], cfg.rope_theta))
            vh.append(v[s, g * Dh:(g + 1) * Dh])
        qs.append(qh)
        ks.append(kh)
        vs.append(vh)
    return qs, ks, vs, 1 / math.sqrt(Dh)


def _mla_qkv(h, p, cfg, pos):
    """MLA (DeepSeek-V2 eq. 9-19): queries, keys from the normalised latent, a shared RoPE key part."""
    m, H = cfg.mla, cfg.n_heads
    nope, rd, vd, eps = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, 1e-6
    qs, ks, vs = [], [], []
    for s in range(h.shape[0]):
        x = h[s]
        if m.q_lora_rank:
            q_a = p["attn.q_a_proj.weight"] @ x + p.get("attn.q_a_proj.bias", 0.0)
            q = p["attn.q_b_proj.weight"] @ rms(q_a, p["attn.q_a_layernorm.weight"], eps)
        else:
            q = p["attn.q_proj.weight"] @ x
        c = p["attn.kv_a_proj_with_mqa.weight"] @ x + p.get("attn.kv_a_proj_with_mqa.bias", 0.0)
        c_kv, k_pe = c[: m.kv_lora_rank], c[m.kv_lora_rank:]
        kv = p["attn.kv_b_proj.weight"] @ rms(c_kv, p["attn.kv_a_layernorm.weight"], eps)
        k_rot = rope_vec(k_pe, pos[s], cfg.rope_theta, m.rope_interleave)
        qh, kh, vh = [], [], []
        for hh in range(H):
            qv = q[hh * (nope + rd):(hh + 1) * (nope + rd)]
            qh.append(torch.cat([qv[:nope], rope_vec(qv[nope:], pos[s], cfg.rope_theta, m.rope_interleave)]))
            kvh = kv[hh * (nope + vd):(hh + 1) * (nope + vd)]
            kh.append(torch.cat([kvh[:nope], k_rot]))
            vh.append(kvh[nope:])
        qs.append(qh)
        ks.append(kh)
        vs.append(vh)
    return qs, ks, vs, 1 / math.sqrt(nope + rd)


def reference_logits(model, input_ids, pad_mask=None, state=None):
    """Logits [B, S, V] in float64 from the model's parameters, one token at a time.

    ``state``: live float64 tensors by state-dict name (for gradients); default a detached copy.
    """
    cfg: ModelConfig = model.cfg
    sd = state if state is not None else {k: v.detach().double() for k, v in model.state_dict().items()}
    B, S = input_ids.shape
    H = cfg.n_heads
    out = []
    for b in range(B):
        valid = [True] * S if pad_mask is None else [bool(v) for v in pad_mask[b]]
        pos = [max(sum(valid[: s + 1]) - 1, 0) for s in range(S)]
        x = torch.stack([sd["embed.weight"][t] for t in input_ids[b].tolist()])
        for i in range(cfg.n_layers):
            p = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
            h = torch.stack([rms(x[s], p["attn_norm.weight"], cfg.norm_eps) for s in range(S)])
            qs, ks, vs_, scale = (_mla_qkv if cfg.attention == "mla" else _gqa_qkv)(h, p, cfg, pos)
            heads = [[None] * H for _ in range(S)]
            for hh in range(H):
                for s in range(S):
                    keys = [t for t in range(s + 1) if valid[t]] or list(range(s + 1))
                    sc = torch.stack([qs[s][hh] @ ks[t][hh] * scale for t in keys])
                    a = torch.softmax(sc, 0)
                    heads[s][hh] = sum(a[j] * vs_[t][hh] for j, t in enumerate(keys))
            attn = torch.stack([torch.cat(heads[s]) for s in range(S)])
            o = attn @ p["attn.o_proj.weight"].t()
            if "attn.o_proj.bias" in p:
                o = o + p["attn.o_proj.bias"]
            if "post_attn_norm.weight" in p:
                o = torch.stack([rms(o[s], p["post_attn_norm.weight"], cfg.norm_eps) for s in range(S)])
            x = x + o
            f = []
            for s in range(S):
                hn = rms(x[s], p["ffn_norm.weight"], cfg.norm_eps)
                fs = torch.zeros_like(hn)
                if cfg.is_moe_layer(i):
                    ids, w = route(hn, {k[4:]: v for k, v in p.items() if k.startswith("ffn.")}, cfg)
                    for e, we in zip(ids.tolist(), w):
                        fs = fs + we * swiglu(hn, p["ffn.experts.w1"][e], p["ffn.experts.w3"][e],
                                            p["ffn.experts.w2"][e])
                    if "ffn.shared.w1" in p:
                        y = swiglu(hn, p["ffn.shared.w1"], p["ffn.shared.w3"], p["ffn.shared.w2"])
                        if "ffn.shared.gate" in p:
                            y = y * torch.sigmoid(hn @ p["ffn.shared.gate"])
                        fs = fs + y
                else:
                    fs = swiglu(hn, p["ffn.gate_proj.weight"].t(), p["ffn.up_proj.weight"].t(),
                                  p["ffn.down_proj.weight"].t())
                if "post_ffn_norm.weight" in p:
                    fs = rms(fs, p["post_ffn_norm.weight"], cfg.norm_eps)
                f.append(fs)
            x = x + torch.stack(f)
        head = sd["embed.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
        out.append(torch.stack([rms(x[s], sd["norm.weight"], cfg.norm_eps) for s in range(S)]) @ head.t())
    return torch.stack(out)
