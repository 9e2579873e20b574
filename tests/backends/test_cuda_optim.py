"""TritonAdamW (anymoe/backends/cuda_optim_kernels.py) on a CUDA device against
torch.optim.AdamW(fused=True) and the float64 AdamW of adamw_reference.py.

Run on the GPU machine: ``python -m pytest -m gpu tests/backends/test_cuda_optim.py``.

Tolerances on p, exp_avg and exp_avg_sq after 5 steps, in units of the storage dtype's spacing
(``adamw_reference.ulps``: at max(|x|, max|x| / 16)); bitwise equality is not expected:
- against float64 rounded to the storage dtype after every step: bf16 and fp16 4 (rounding only;
  the CPU interpreter run of the same kernel measured <= 2), fp32 32 (fp32 arithmetic; measured
  <= 16 in the interpreter);
- against torch's fused CUDA kernel: no farther than torch's own distance from float64 plus the
  tolerance above. torch's CUDA kernel forms 1 - beta in float32 from float32 betas (1 - fp32(0.999)
  is 1.3e-5 off), measured on the H100 at up to 8 bf16 ulps (exp_avg) and ~170 fp32 ulps
  (exp_avg_sq) from float64; TritonAdamW gets 1 - beta from the host in double.
"""

import functools
import io

import pytest
import torch
from adamw_reference import reference_adamw, round_nearest, ulps

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)", allow_module_level=True)
ok = pytest.importorskip("anymoe.backends.cuda_optim_kernels")
if not ok.HAVE_TRITON:
    pytest.skip("needs Triton (not importable here)", allow_module_level=True)

DEV = torch.device("cuda")
STEPS = 5
# BLOCK = 2048: a lone tail, a chunk + tail, whole chunks, chunks + tail, empty, 2-D, ~490 chunks
SIZES = [1, 7, 2049, 3 * 2048, 3 * 2048 + 5, 0, (129, 65), 1_000_003]
HYPER = [dict(lr=0.05, weight_decay=0.5, betas=(0.9, 0.999), eps=1e-8),
         dict(lr=0.02, weight_decay=0.0, betas=(0.8, 0.99), eps=0.1)]  # eps of the order of sqrt(v)
TOL_REF = {torch.bfloat16: 4, torch.float16: 4, torch.float32: 32}
TORCH_FUSED = functools.partial(torch.optim.AdamW, fused=True)


def _count_launches(monkeypatch) -> list[int]:
    """Tensors per kernel launch, so a silent fall back to torch fails the test."""
    launched = []
    real = ok.launch_adamw

    def counting(params, *args, **kwargs):
        launched.append(len(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(ok, "launch_adamw", counting)
    return launched


def _data(dtype, seed):
    """Start weights per group and, per weight, one gradient per step (CPU)."""
    g = torch.Generator().manual_seed(seed)
    start = [[torch.randn(s, generator=g).to(dtype) for s in SIZES] for _ in HYPER]
    grads = [[[torch.randn(p.shape, generator=g).to(dtype) for _ in range(STEPS)] for p in ps]
             for ps in start]
    return start, grads


def _run(make_opt, start, grads, steps=range(STEPS), state_dict=None, grad_coef=1.0):
    params = [[torch.nn.Parameter(p.to(DEV, copy=True)) for p in ps] for ps in start]
    opt = make_opt([{"params": ps, **h} for ps, h in zip(params, HYPER)])
    if state_dict is not None:
        opt.load_state_dict(state_dict)
    for s in steps:
        for ps, gs in zip(params, grads):
            for p, gl in zip(ps, gs):
                p.grad = gl[s].to(DEV)
        opt.step(**({"grad_coef": grad_coef} if grad_coef != 1.0 else {}))
    return params, opt


def _triple(opt, p):
    st = opt.state[p]
    return [t.detach().cpu() for t in (p, st["exp_avg"], st["exp_avg_sq"])]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_matches_float64_and_torch_fused(dtype, monkeypatch):
    launched = _count_launches(monkeypatch)
    start, grads = _data(dtype, 0)
    ours, opt = _run(ok.TritonAdamW, start, grads)
    assert launched == [len(SIZES)] * (STEPS * len(HYPER))  # every tensor in the kernel, one launch a group
    theirs, torch_opt = _run(TORCH_FUSED, start, grads)
    for gi, h in enumerate(HYPER):
        for p, q, p0, gl in zip(ours[gi], theirs[gi], start[gi], grads[gi]):
            ref = reference_adamw(p0, gl, store=round_nearest(dtype), **h)
            for name, got, want, other in zip(("p", "exp_avg", "exp_avg_sq"), _triple(opt, p), ref,
                                              _triple(torch_opt, q)):
                assert got.dtype == dtype
                where = (gi, p.shape, name)
                assert ulps(got, want, dtype) <= TOL_REF[dtype], (*where, ulps(got, want, dtype))
                bound = ulps(other, want, dtype) + TOL_REF[dtype] + 1  # torch's own error + ours
                assert ulps(got, other, dtype) <= bound, (*where, ulps(got, other, dtype), bound)
            step = opt.state[p]["step"]
            assert step.device.type == "cpu" and step.dtype == torch.float32 and float(step) == STEPS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grad_coef_is_clipping_inside_the_update(dtype, monkeypatch):
    """step(grad_coef=c) updates as if every gradient were c * grad (float64 reference on scaled
    gradients), in the kernel: the gradients themselves are left as they were."""
    launched = _count_launches(monkeypatch)
    start, grads = _data(dtype, 2)
    coef = 0.37
    ours, opt = _run(ok.TritonAdamW, start, grads, grad_coef=coef)
    assert launched == [len(SIZES)] * (STEPS * len(HYPER))
    for gi, h in enumerate(HYPER):
        for p, p0, gl in zip(ours[gi], start[gi], grads[gi]):
            assert torch.equal(p.grad.cpu(), gl[-1])  # read scaled, not scaled in place
            ref = reference_adamw(p0, [g.double() * coef for g in gl], store=round_nearest(dtype), **h)
            for name, got, want in zip(("p", "exp_avg", "exp_avg_sq"), _triple(opt, p), ref):
                assert ulps(got, want, dtype) <= TOL_REF[dtype], (gi, p.shape, name, ulps(got, want, dtype))


def test_master_weights_in_the_kernel(monkeypatch):
    """master_weights=True over bf16 parameters: fp32 masters and moments stepped by the kernel
    (float64 reference on the bf16 gradients times the clipping coefficient), each parameter
    written in the same launch as its master rounded to nearest bf16."""
    launched = _count_launches(monkeypatch)
    start, grads = _data(torch.bfloat16, 3)
    params = [[torch.nn.Parameter(p.to(DEV, copy=True)) for p in ps] for ps in start]
    opt = ok.TritonAdamW([{"params": ps, **h} for ps, h in zip(params, HYPER)], master_weights=True)
    coef = 0.37
    for s in range(STEPS):
        for ps, gs in zip(params, grads):
            for p, gl in zip(ps, gs):
                p.grad = gl[s].to(DEV)
        opt.step(grad_coef=coef)
    assert launched == [len(SIZES)] * (STEPS * len(HYPER))
    for gi, h in enumerate(HYPER):
        for p, p0, gl in zip(params[gi], start[gi], grads[gi]):
            st = opt.state[p]
            fp32 = torch.float32
            ref = reference_adamw(p0, [g.double() * coef for g in gl], store=round_nearest(fp32), **h)
            for name, got, want in zip(("master", "exp_avg", "exp_avg_sq"),
                                       (st["master"], st["exp_avg"], st["exp_avg_sq"]), ref):
                got = got.cpu()
                assert got.dtype == fp32 and ulps(got, want, fp32) <= TOL_REF[fp32], (gi, p.shape, name)
            assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), st["master"].to(torch.bfloat16))


def test_bf16_moments_in_the_kernel(monkeypatch):
    """moment_dtype=bf16 (optim.moment_dtype): the kernel loads the bf16 moments to fp32, steps the
    fp32 master with the unrounded new moments and stores them rounded to nearest bf16, in the same
    launch; float64 reference with that storage."""
    launched = _count_launches(monkeypatch)
    start, grads = _data(torch.bfloat16, 5)
    params = [[torch.nn.Parameter(p.to(DEV, copy=True)) for p in ps] for ps in start]
    opt = ok.TritonAdamW([{"params": ps, **h} for ps, h in zip(params, HYPER)], master_weights=True,
                         moment_dtype=torch.bfloat16)
    for s in range(STEPS):
        for ps, gs in zip(params, grads):
            for p, gl in zip(ps, gs):
                p.grad = gl[s].to(DEV)
        opt.step()
    assert launched == [len(SIZES)] * (STEPS * len(HYPER))
    for gi, h in enumerate(HYPER):
        for p, p0, gl in zip(params[gi], start[gi], grads[gi]):
            st = opt.state[p]
            master, m, v = reference_adamw(p0, gl, store=round_nearest(torch.float32),
                                           store_moments=round_nearest(torch.bfloat16), **h)
            assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
            assert ulps(st["exp_avg"].cpu(), m, torch.bfloat16) <= TOL_REF[torch.bfloat16], (gi, p.shape)
            assert ulps(st["exp_avg_sq"].cpu(), v, torch.bfloat16) <= TOL_REF[torch.bfloat16], (gi, p.shape)
            # a moment one bf16 ulp off moves later updates by ~lr * 2**-8: measured 7527 fp32 ulps
            # (0.11 bf16 ulps) on the H100; a wrong update term moves it by whole lr-sized steps
            assert ulps(st["master"].cpu(), master, torch.bfloat16) <= 0.5, (gi, p.shape)


def test_a_misaligned_view_goes_to_torch_fused_and_still_matches(monkeypatch):
    launched = _count_launches(monkeypatch)
    g = torch.Generator().manual_seed(2)
    dt = torch.bfloat16
    first = torch.randn(4096, generator=g).to(dt)
    others = [torch.randn(n, generator=g).to(dt) for n in (2049, 7)]

    def params():
        misaligned = torch.empty(4097, dtype=dt, device=DEV)[1:]  # 2 bytes past a 16-byte boundary
        misaligned.copy_(first)
        return [torch.nn.Parameter(misaligned)] + [torch.nn.Parameter(t.to(DEV)) for t in others]

    ours, theirs = params(), params()
    assert ours[0].data_ptr() % 16 == 2
    hyper = dict(lr=0.05, weight_decay=0.5, betas=(0.9, 0.999), eps=1e-8)
    a = ok.TritonAdamW(ours, **hyper)
    b = TORCH_FUSED(theirs, **hyper)
    grads = [[] for _ in ours]
    for _ in range(STEPS):
        for p, q, gl in zip(ours, theirs, grads):
            p.grad = torch.randn(p.shape, generator=g).to(dt).to(DEV)
            q.grad = p.grad.clone()
            gl.append(p.grad.cpu())
        a.step()
        b.step()
    assert launched == [2] * STEPS  # the two aligned tensors
    for x, y in zip(_triple(a, ours[0]), _triple(b, theirs[0])):
        assert torch.equal(x, y)  # the misaligned one ran through torch's own fused kernel
    for p, q, p0, gl in zip(ours[1:], theirs[1:], others, grads[1:]):
        ref = reference_adamw(p0, gl, store=round_nearest(dt), **hyper)
        for x, y, want in zip(_triple(a, p), _triple(b, q), ref):
            assert ulps(x, want, dt) <= TOL_REF[dt]
            assert ulps(x, y, dt) <= ulps(y, want, dt) + TOL_REF[dt] + 1
    assert a.state[ours[0]]["step"].device.type == "cpu" and float(a.state[ours[0]]["step"]) == STEPS


@pytest.mark.parametrize("first", ["triton", "torch_fused"])
def test_state_dict_moves_between_triton_and_torch_fused(first):
    """Two steps in one, its state_dict through torch.save/torch.load (tensors stay on the GPU, so a
    torch-fused step arrives on the device) into the other, three more steps: the weights and
    moments of five steps, as close to float64 as five torch-fused steps are (plus our tolerance)."""
    make = {"triton": ok.TritonAdamW, "torch_fused": TORCH_FUSED}
    second = "torch_fused" if first == "triton" else "triton"
    dt = torch.float32
    start, grads = _data(dt, 3)
    head, head_opt = _run(make[first], start, grads, steps=range(2))
    buf = io.BytesIO()
    torch.save(head_opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    weights = [[p.detach() for p in ps] for ps in head]
    tail, tail_opt = _run(make[second], weights, grads, steps=range(2, STEPS), state_dict=saved)
    torch_only, torch_opt = _run(TORCH_FUSED, start, grads)  # five torch steps: its own error
    for gi, h in enumerate(HYPER):
        for p, q, p0, gl in zip(tail[gi], torch_only[gi], start[gi], grads[gi]):
            ref = reference_adamw(p0, gl, store=round_nearest(dt), **h)
            # Steps from both optimizers: within torch's own error (it has some of the steps) + ours.
            for x, y, want in zip(_triple(tail_opt, p), _triple(torch_opt, q), ref):
                assert ulps(x, want, dt) <= ulps(y, want, dt) + TOL_REF[dt] + 1
            assert float(tail_opt.state[p]["step"]) == STEPS
            if second == "triton":  # torch's fused step came on the device: read back once, then on the CPU
                assert tail_opt.state[p]["step"].device.type == "cpu"


def test_a_step_does_not_wait_for_the_gpu():
    """After the first step (kernel compile, chunk tables), a step issues work and returns: the
    pointer table goes up from pinned memory, the step counts stay on the CPU."""
    start, grads = _data(torch.bfloat16, 4)
    params, opt = _run(ok.TritonAdamW, start, grads, steps=range(1))
    for ps, gs in zip(params, grads):
        for p, gl in zip(ps, gs):
            p.grad = gl[1].to(DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(float(opt.state[p]["step"]) == 2 for ps in params for p in ps)


@pytest.mark.parametrize("misaligned", [False, True])
@pytest.mark.parametrize("master_weights", [False, True])
def test_device_coef_is_the_float_coef_skips_when_not_finite_and_does_not_sync(master_weights, misaligned):
    """step(grad_coef=<float64 CUDA scalar>) (the trainer's queued step): the float coef's step bit
    for bit, in the kernel and for a misaligned tensor in torch's fused kernel (found_inf); a NaN or
    inf coef writes nothing, and undo_step() puts the state_dict back. All in the kernel, the step is
    issued without a host sync (torch's fused path copies its step counts up from pageable memory,
    a sync, with a float coef too)."""
    import copy

    g = torch.Generator().manual_seed(5)
    dt = torch.bfloat16
    first = torch.randn(4096, generator=g).to(dt)
    others = [torch.randn(n, generator=g).to(dt) for n in (2049, 7, 1_000_003)]

    def make():
        view = torch.empty(4097, dtype=dt, device=DEV)[1:]
        view.copy_(first)
        params = [torch.nn.Parameter(view)] + [torch.nn.Parameter(t.to(DEV)) for t in others]
        params = params if misaligned else params[1:]
        return params, ok.TritonAdamW(params, lr=0.05, weight_decay=0.5, master_weights=master_weights)

    def everything(params, opt):
        return [t.detach().clone() for p in params for t in (p, p.grad)], copy.deepcopy(opt.state_dict())

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return torch.equal(a, b) if torch.is_tensor(a) else a == b

    (ps, float_opt), (qs, dev_opt) = make(), make()
    assert dev_opt.takes_device_coef()
    for s, coef in enumerate((0.37, 1.0, 0.123456789, 0.37)):
        grads = [torch.randn(p.shape, generator=g).to(dt).to(DEV) for p in ps]
        for p, q, gr in zip(ps, qs, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        float_opt.step(grad_coef=coef)
        dev_coef = torch.tensor(coef, dtype=torch.float64, device=DEV)
        if s and not misaligned:  # after the first step (compile, tables): no host sync
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            dev_opt.step(grad_coef=dev_coef)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert same(everything(qs, dev_opt), everything(ps, float_opt)), coef
    for bad in (float("nan"), float("inf")):
        before = everything(qs, dev_opt)
        dev_opt.step(grad_coef=torch.tensor(bad, dtype=torch.float64, device=DEV))
        assert same(everything(qs, dev_opt)[0], before[0]), bad
        dev_opt.undo_step()
        assert same(everything(qs, dev_opt), before), bad


def test_build_optimizer_takes_it_on_cuda():
    from anymoe.core.backend import get_backend
    from anymoe.trainers.optim import OptimConfig, build_optimizer

    backend = get_backend("cuda")
    model = torch.nn.Linear(8, 8).to(DEV)
    assert type(build_optimizer(model, OptimConfig(), backend)) is ok.TritonAdamW
    assert build_optimizer(model, OptimConfig(fused="on"), backend).defaults["fused"] is True
