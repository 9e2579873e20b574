"""AdamW written out in float64, for the TritonAdamW tests (the interpreter one and the GPU one).

Not a test module: imported by tests/backends/test_cuda_optim.py and, inside its subprocess, by
tests/backends/test_cuda_optim_interpreter.py.
"""

import math

import torch

MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def reference_adamw(p0, grads, *, lr, betas, eps, weight_decay, store, store_moments=None):
    """(param, exp_avg, exp_avg_sq) in float64 after one step per gradient, from zero moments.

    torch.optim.AdamW's algorithm: decay the weight, update the moments, step by the bias-corrected
    ratio. ``store(x)`` rounds a float64 tensor to the storage dtype (and back to float64) after
    each step, as the optimizer keeps p, m, v in their dtypes between steps; ``store_moments``
    (default ``store``) rounds m and v when they are kept in another dtype (bf16 moments).
    """
    store_moments = store_moments or store
    beta1, beta2 = betas
    p = p0.double()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr / (1 - beta1**t) * m / (v.sqrt() / math.sqrt(1 - beta2**t) + eps)
        p, m, v = store(p), store_moments(m), store_moments(v)
    return p, m, v


def round_nearest(dtype):
    """Storage rounding of the compiled kernels and of torch: round to nearest even."""
    return lambda x: x.to(dtype).double()


def truncate_bf16(x):
    """fp32 -> bf16 by dropping the low 16 bits: what Triton 3.6's CPU interpreter does for
    ``.to(tl.bfloat16)`` (its fp_trunc ignores the rounding mode; the GPU rounds to nearest even)."""
    bits = x.float().view(torch.int32) & -65536  # keep sign, exponent and the top 7 mantissa bits
    return bits.view(torch.float32).double()


def ulps(a, ref, dtype):
    """Largest |a - ref| in units of the storage dtype's spacing at max(|ref|, scale / 16),
    scale = max |ref| (near-zero entries, e.g. a moment that just crossed zero, are held to the
    tensor's scale rather than to their own tiny spacing)."""
    a, ref = a.double(), ref.double()
    if ref.numel() == 0:
        return 0.0
    floor = ref.abs().max() / 16
    _, exponent = torch.frexp(torch.maximum(ref.abs(), floor).clamp_min(1e-300))
    spacing = torch.ldexp(torch.ones_like(ref), exponent - 1 - MANTISSA_BITS[dtype])
    return float(((a - ref).abs() / spacing).max())
