"""Bitwise comparison of what a step can write, for tests that assert two flows are the same bit for
bit (the queued vs synchronous trainer step, TritonAdamW's paths, skipped steps that write nothing).
Imported by name: tests/ is on sys.path (tests/conftest.py; subprocess scripts insert it)."""

import copy
import math

import torch


def same(a, b, nan_equal: bool = False) -> bool:
    """Nested dicts / lists / tuples of tensors and plain values equal bit for bit (dtype, shape and
    values of tensors); ``nan_equal``: a float NaN equals a float NaN (logged losses of a bad step)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], nan_equal) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, nan_equal) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if nan_equal and isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def snapshot(params, opt):
    """Every tensor an optimizer step could write (params and grads, cloned; ``params`` flat or a
    list of groups) and a deep copy of the optimizer's state_dict."""
    flat = [p for ps in params for p in ps] if params and isinstance(params[0], list) else list(params)
    tensors = [t.detach().clone() for p in flat for t in (p, p.grad) if t is not None]
    return tensors, copy.deepcopy(opt.state_dict())
