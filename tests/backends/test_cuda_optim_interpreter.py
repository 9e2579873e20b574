"""TritonAdamW's kernel (anymoe/backends/cuda_optim_kernels.py) in Triton's CPU interpreter
(TRITON_INTERPRET=1, in a subprocess) against the float64 AdamW of adamw_reference.py and against
torch.optim.AdamW: a check of kernel edits on a machine without a GPU. CPU builds of torch ship
without Triton, so this skips there; tests/backends/test_cuda_optim.py (-m gpu) runs it compiled.

The real kernel and the real optimizer run: a subclass only sets ``kernel_device_type = "cpu"``
(the interpreter reads CPU memory, and its int64 -> pointer casts work on CPU addresses), and the
launches are counted, so a silent fall back to torch would fail. One difference from the GPU: the
interpreter rounds fp32 -> bf16 by truncation (Triton 3.6's fp_trunc ignores the rounding mode),
so bf16 is compared with a float64 reference that truncates the same way (<= 2 bf16 ulps), and
not with torch, which rounds to nearest; the GPU test compares bf16 with both.

A device coefficient (``step(grad_coef=<float64 tensor>)``) is checked against the float one bit
for bit, and a NaN or inf one against "nothing written", then ``undo_step`` against the state_dict.
"""

import pytest
import torch
from test_cuda_kernels_interpreter import _interpret

CODE = """
import copy
import sys
import torch
sys.path[:0] = ["tests/backends", "tests"]
from adamw_reference import reference_adamw, round_nearest, truncate_bf16, ulps
from bitwise import same, snapshot
from anymoe.backends import cuda_optim_kernels as ok

class InterpretedAdamW(ok.TritonAdamW):
    kernel_device_type = "cpu"

launched = []
real_launch = ok.launch_adamw
def counting_launch(params, *args, **kwargs):
    launched.append(len(params))
    return real_launch(params, *args, **kwargs)
ok.launch_adamw = counting_launch

g = torch.Generator().manual_seed(0)
STEPS = 5
SIZES = [1, 7, 2049, 3 * 2048, 0]  # BLOCK = 2048: a lone tail, a full chunk + tail, 3 full chunks, empty
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HYPER = [dict(lr=0.05, weight_decay=0.5, betas=(0.9, 0.999), eps=1e-8),
         dict(lr=0.02, weight_decay=0.0, betas=(0.8, 0.99), eps=0.1)]  # eps of the order of sqrt(v)
# fp32 differs from float64 by fp32 arithmetic, bf16 and fp16 by rounding only
TOL = {torch.float32: 32, torch.bfloat16: 2, torch.float16: 4}  # in ulps (adamw_reference.ulps)

def param(n, dt):
    return torch.randn(n, generator=g).to(dt)

def misaligned_copy(t):
    out = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]  # data_ptr 4 bytes past a 16-byte boundary
    return out.copy_(t)

start = [[param(n, dt) for dt in DTYPES for n in SIZES] for _ in HYPER]
start[0] += [param(33, torch.float32), param(4097, torch.float32)]
NO_GRAD, MISALIGNED = len(start[0]) - 2, len(start[0]) - 1  # in group 0: no gradient; torch's path
grads = [[[torch.randn(p.shape, generator=g).to(p.dtype) for _ in range(STEPS)] for p in ps] for ps in start]

def run(opt_class, first=0, last=STEPS, resume=None, coef=None, **kw):
    params = [[torch.nn.Parameter(p.clone()) for p in ps] for ps in start]
    params[0][MISALIGNED] = torch.nn.Parameter(misaligned_copy(start[0][MISALIGNED]))
    opt = opt_class([{"params": ps, **h} for ps, h in zip(params, HYPER)], **kw)
    if resume is not None:
        weights, state_dict = resume
        for live, saved in zip(params, weights):
            for p, q in zip(live, saved):
                p.data.copy_(q)
        opt.load_state_dict(state_dict)
    for s in range(first, last):
        for gi, (ps, gs) in enumerate(zip(params, grads)):
            for i, (p, gl) in enumerate(zip(ps, gs)):
                p.grad = None if (gi, i) == (0, NO_GRAD) else gl[s].clone()
        opt.step(**({"grad_coef": coef} if coef is not None else {}))
    return params, opt

def skipped_steps_write_nothing(params, opt, grads_now):
    # a NaN or inf device coef: the kernel is launched and writes nothing; the host half (the step
    # counts) goes back with undo_step(), and state_dict() is bitwise as before
    for bad in (float("nan"), float("inf"), -float("inf")):
        grads_now()
        before = snapshot(params, opt)
        n = len(launched)
        opt.step(grad_coef=torch.tensor(bad, dtype=torch.float64))
        assert len(launched) > n  # the kernel ran and skipped: not a fall back to the host
        if not same(snapshot(params, opt)[0], before[0]):
            raise AssertionError(f"a step with coef {bad} wrote a tensor")
        opt.undo_step()
        assert same(snapshot(params, opt), before), bad

params, opt = run(InterpretedAdamW)
assert len(launched) == STEPS * len(HYPER) * len(DTYPES), launched  # one launch per dtype per group
mis = params[0][MISALIGNED]
assert mis.data_ptr() % 16 and not ok.kernel_takes(mis, mis.grad, mis, mis, "cpu")
assert params[0][NO_GRAD] not in opt.state and torch.equal(params[0][NO_GRAD], start[0][NO_GRAD])
for gi, h in enumerate(HYPER):
    for i, (p, p0, gl) in enumerate(zip(params[gi], start[gi], grads[gi])):
        if (gi, i) == (0, NO_GRAD):
            continue
        st = opt.state[p]
        assert st["step"].dtype == torch.float32 and st["step"].device.type == "cpu" and st["step"] == STEPS
        dt = p.dtype
        store = truncate_bf16 if dt == torch.bfloat16 else round_nearest(dt)
        ref = reference_adamw(p0, gl, store=store, **h)
        for got, want in zip((p, st["exp_avg"], st["exp_avg_sq"]), ref):
            assert got.dtype == dt and ulps(got.detach(), want, dt) <= TOL[dt], (gi, dt, p.numel())

twin, torch_opt = run(torch.optim.AdamW, fused=True)
for ps, qs in zip(params, twin):
    for p, q in zip(ps, qs):
        if p.dtype != torch.bfloat16 and p in opt.state:
            for key in ("exp_avg", "exp_avg_sq"):
                assert ulps(opt.state[p][key], torch_opt.state[q][key], p.dtype) <= TOL[p.dtype], key
            assert ulps(p.detach(), q.detach(), p.dtype) <= TOL[p.dtype], (p.dtype, p.numel())

# step(grad_coef=c): the update of c * grad; the kernel reads it scaled, torch's path scales in place
COEF = 0.37
scaled, scaled_opt = run(InterpretedAdamW, coef=COEF)
for gi, h in enumerate(HYPER):
    for i, (p, p0, gl) in enumerate(zip(scaled[gi], start[gi], grads[gi])):
        if (gi, i) == (0, NO_GRAD):
            continue
        dt = p.dtype
        store = truncate_bf16 if dt == torch.bfloat16 else round_nearest(dt)
        ref = reference_adamw(p0, [g.double() * COEF for g in gl], store=store, **h)
        st = scaled_opt.state[p]
        for got, want in zip((p, st["exp_avg"], st["exp_avg_sq"]), ref):
            assert ulps(got.detach(), want, dt) <= TOL[dt], ("coef", gi, dt, p.numel())
        in_kernel = ok.kernel_takes(p, p.grad, st["exp_avg"], st["exp_avg_sq"], "cpu")
        assert torch.equal(p.grad, gl[-1] if in_kernel else gl[-1] * COEF), (gi, i, in_kernel)

# a device coef (float64 scalar tensor): the same bits as the float coef, kernel and torch paths
dev_scaled, dev_opt = run(InterpretedAdamW, coef=torch.tensor(COEF, dtype=torch.float64))
assert dev_opt.takes_device_coef()
for ps, qs in zip(dev_scaled, scaled):
    for p, q in zip(ps, qs):
        assert same(p, q) and same(p.grad, q.grad) and same(dev_opt.state.get(p), scaled_opt.state.get(q))
assert same(dev_opt.state_dict(), scaled_opt.state_dict())

def next_grads():
    for gi, (ps, gs) in enumerate(zip(dev_scaled, grads)):
        for i, (p, gl) in enumerate(zip(ps, gs)):
            p.grad = None if (gi, i) == (0, NO_GRAD) else gl[0].clone()

skipped_steps_write_nothing(dev_scaled, dev_opt, next_grads)

# master weights: bf16 parameters, fp32 masters and moments stepped by the kernel, which also
# writes each parameter as its master rounded to bf16 (truncated, in the interpreter)
launched.clear()
mw = [torch.nn.Parameter(param(n, torch.float32).to(torch.bfloat16)) for n in (7, 2049, 3 * 2048)]
mw_grads = [[torch.randn(p.shape, generator=g).to(torch.bfloat16) for _ in range(STEPS)] for p in mw]
mw_start = [p.detach().clone() for p in mw]
mw_opt = InterpretedAdamW(mw, master_weights=True, **HYPER[0])
for s in range(STEPS):
    for p, gl in zip(mw, mw_grads):
        p.grad = gl[s].clone()
    mw_opt.step(grad_coef=COEF)
assert launched == [len(mw)] * STEPS, launched
for p, p0, gl in zip(mw, mw_start, mw_grads):
    st = mw_opt.state[p]
    ref = reference_adamw(p0, [x.double() * COEF for x in gl], store=round_nearest(torch.float32), **HYPER[0])
    for got, want in zip((st["master"], st["exp_avg"], st["exp_avg_sq"]), ref):
        assert got.dtype == torch.float32 and ulps(got, want, torch.float32) <= TOL[torch.float32], p.numel()
    assert p.dtype == torch.bfloat16
    assert torch.equal(p.detach().double(), truncate_bf16(st["master"].double()))

# the same with a device coef: bit for bit; a NaN or inf one leaves masters and bf16 copies alone
mw_dev = [torch.nn.Parameter(p0.clone()) for p0 in mw_start]
mw_dev_opt = InterpretedAdamW(mw_dev, master_weights=True, **HYPER[0])
for s in range(STEPS):
    for p, gl in zip(mw_dev, mw_grads):
        p.grad = gl[s].clone()
    mw_dev_opt.step(grad_coef=torch.tensor(COEF, dtype=torch.float64))
assert mw_dev_opt.takes_device_coef()
assert same(mw_dev, mw) and same(mw_dev_opt.state_dict(), mw_opt.state_dict())

def next_mw_grads():
    for p, gl in zip(mw_dev, mw_grads):
        p.grad = gl[0].clone()

skipped_steps_write_nothing(mw_dev, mw_dev_opt, next_mw_grads)

# three steps in torch, two more in the kernel from torch's state_dict: the step count carries over
half, half_opt = run(torch.optim.AdamW, last=3)
weights = [[p.detach() for p in ps] for ps in half]
resumed, resumed_opt = run(InterpretedAdamW, first=3, resume=(weights, half_opt.state_dict()))
for ps, qs in zip(resumed, params):
    for p, q in zip(ps, qs):
        if p.dtype == torch.float32 and p in resumed_opt.state:
            assert resumed_opt.state[p]["step"] == STEPS
            assert ulps(p.detach(), q.detach(), p.dtype) <= TOL[p.dtype], p.numel()
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernel")
def test_triton_adamw_kernel_in_triton_cpu_interpreter():
    _interpret(CODE)


def test_kernel_compiles_for_sm90_with_vector_loads(tmp_path, monkeypatch):
    """Compiled for an H100 (no GPU needed: Triton's own ptxas): a full chunk is read and written in
    16-byte vector accesses, the point of the alignment hints and the unmasked branch (without them
    the prototype ran at 22 ms instead of 6.8). 128 threads of BLOCK = 2048 elements: 16 each."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    from anymoe.backends import cuda_optim_kernels as ok

    if not ok.HAVE_TRITON or not hasattr(ok._adamw_kernel, "arg_names"):
        pytest.skip("Triton is in interpreter mode or missing here")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    sig = {name: "*i64" for name in ("P", "G", "M", "V", "Q", "START", "NUMEL")} | {"TENSOR": "*i32"}
    scalars = ("decay", "step_size", "one_minus_b1", "beta2", "one_minus_b2", "eps", "bc2_sqrt", "grad_coef")
    sig |= {name: "fp32" for name in scalars}
    for dtype, size in ((torch.bfloat16, 2), (torch.float32, 4)):
        tl_dtype = ok._TL_DTYPE[dtype]
        constexprs = {"P_DTYPE": tl_dtype, "G_DTYPE": tl_dtype, "S_DTYPE": tl_dtype, "Q_DTYPE": tl_dtype,
                      "HAS_Q": False, "COEF_ON_DEVICE": False, "BLOCK": ok.BLOCK}
        signature = {name: sig.get(name, "constexpr") for name in ok._adamw_kernel.arg_names}
        try:
            kernel = triton_compile(ASTSource(ok._adamw_kernel, signature, constexprs),
                                    target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        except Exception as err:  # no CUDA backend in this Triton build
            pytest.skip(f"Triton cannot compile for sm_90 here: {err!r}"[:200])
        ptx = kernel.asm["ptx"]
        per_tensor = 16 * size // 16  # 16 elements per thread in 16-byte vectors
        assert ptx.count("ld.global.v4.b32") == 4 * per_tensor, dtype  # p, g, m, v
        assert ptx.count("st.global.v4.b32") == 3 * per_tensor, dtype  # p, m, v
    # master weights: fp32 master and moments, bf16 gradient and bf16 copy, all in 16-byte vectors;
    # the same with the coef read from a float64 device scalar (one load, one round to fp32)
    f32, b16 = ok._TL_DTYPE[torch.float32], ok._TL_DTYPE[torch.bfloat16]
    for on_device in (False, True):
        constexprs = {"P_DTYPE": f32, "G_DTYPE": b16, "S_DTYPE": f32, "Q_DTYPE": b16, "HAS_Q": True,
                      "COEF_ON_DEVICE": on_device, "BLOCK": ok.BLOCK}
        signature["grad_coef"] = "*fp64" if on_device else "fp32"
        kernel = triton_compile(ASTSource(ok._adamw_kernel, signature, constexprs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        ptx = kernel.asm["ptx"]
        assert ptx.count("ld.global.v4.b32") == 4 + 2 + 4 + 4  # master, g (bf16), m, v
        assert ptx.count("st.global.v4.b32") == 4 + 2 + 4 + 4  # master, the bf16 copy, m, v
        assert ptx.count("cvt.rn.f32.f64") == on_device  # rounded to nearest, as a float argument
