"""TritonAdamW's host logic on the CPU, no Triton or GPU needed (anymoe/backends/cuda_optim_kernels.py):
the chunk table, which tensors share a launch, what goes to torch instead, and that its state and
state_dict are torch.optim.AdamW's. The kernel itself: test_cuda_optim_interpreter.py (CPU) and
test_cuda_optim.py (-m gpu).

On the CPU every tensor goes to torch (the kernel takes CUDA tensors), through torch's fused kernel:
TritonAdamW there is torch.optim.AdamW(fused=True) bit for bit. Tests of the launch logic swap the
launch for a recorder and let CPU tensors in (``kernel_device_type = "cpu"``).
"""

import io

import pytest
import torch
from bitwise import same, snapshot

from anymoe.backends import cuda_optim_kernels as ok
from anymoe.core.backend import create_backend


class CPUKernelAdamW(ok.TritonAdamW):
    kernel_device_type = "cpu"


@pytest.fixture
def launches(monkeypatch):
    """Record launches (dtype triple, tensors, step) instead of running the kernel."""
    calls = []

    def record(params, grads, exp_avgs, exp_avg_sqs, *, step, **hyper):
        calls.append(((params[0].dtype, grads[0].dtype, exp_avgs[0].dtype), [id(p) for p in params], step))

    monkeypatch.setattr(ok, "HAVE_TRITON", True)
    monkeypatch.setattr(ok, "launch_adamw", record)
    return calls


def _params(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _twins(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def test_chunk_table_worked_example():
    # numels 1, 0, 2049, 4096 in chunks of 2048: 1 + 0 + 2 + 2 chunks
    tensor_C, start_C = ok.chunk_table((1, 0, 2049, 4096), 2048)
    assert tensor_C.dtype == torch.int32 and start_C.dtype == torch.int64
    assert tensor_C.tolist() == [0, 2, 2, 3, 3] and start_C.tolist() == [0, 0, 2048, 0, 2048]


def test_chunk_table_against_a_loop():
    g = torch.Generator().manual_seed(0)
    numels = tuple(torch.randint(0, 100, (40,), generator=g).tolist()) + (0, 16, 17)
    want_t, want_s = [], []
    for t, n in enumerate(numels):
        for s in range(0, n, 16):
            want_t.append(t)
            want_s.append(s)
    tensor_C, start_C = ok.chunk_table(numels, 16)
    assert tensor_C.tolist() == want_t and start_C.tolist() == want_s
    assert ok.chunk_table((), 16)[0].numel() == 0 and ok.chunk_table((0, 0), 16)[0].numel() == 0


@pytest.mark.parametrize("option", [{"amsgrad": True}, {"maximize": True}, {"capturable": True},
                                    {"differentiable": True}, {"lr": torch.tensor(0.01)}])
def test_group_options_the_kernel_lacks(option):
    plain = ok.TritonAdamW(_params(3), lr=0.01)
    assert ok.group_uses_kernel(plain.param_groups[0])
    assert not ok.group_uses_kernel(ok.TritonAdamW(_params(3), **{"lr": 0.01, **option}).param_groups[0])


@pytest.mark.parametrize("option", [{"amsgrad": True}, {"maximize": True}])
def test_such_a_group_steps_exactly_as_torch(launches, option):
    ours = _params(5, 7)
    theirs = _twins(ours)
    a = CPUKernelAdamW(ours, lr=0.1, weight_decay=0.1, **option)
    b = torch.optim.AdamW(theirs, lr=0.1, weight_decay=0.1, **option)
    for seed in range(3):
        _set_grads(ours, seed)
        _set_grads(theirs, seed)
        a.step()
        b.step()
    assert launches == []
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


def test_kernel_takes():
    x = torch.zeros(64)
    assert ok.kernel_takes(x, x, x, x, "cpu")
    assert not ok.kernel_takes(x, x, x, x, "cuda")  # another device type
    odd = torch.zeros(65)[1:]  # 4 bytes past a 16-byte boundary
    assert odd.data_ptr() % 16 and not ok.kernel_takes(odd, x, x, x, "cpu")
    assert not ok.kernel_takes(x, x, x, odd, "cpu")
    t = torch.zeros(8, 8).t()
    assert not t.is_contiguous() and not ok.kernel_takes(t, t, t, t, "cpu")
    d = torch.zeros(64, dtype=torch.float64)
    assert not ok.kernel_takes(d, d, d, d, "cpu")  # float64 is not a kernel dtype
    h = torch.zeros(64, dtype=torch.bfloat16)
    assert ok.kernel_takes(x, h, h, h, "cpu") and not ok.kernel_takes(x, x, x, h, "cpu")  # m, v: one dtype

    class Sub(torch.Tensor):  # stands for DTensor and other wrappers
        pass

    s = torch.zeros(64).as_subclass(Sub)
    assert not ok.kernel_takes(s, x, x, x, "cpu")
    assert ok.kernel_takes(torch.nn.Parameter(x), x, x, x, "cpu")  # a Parameter is a plain tensor


def test_one_launch_per_dtype_triple_and_step(launches):
    a, b = _params(5, 4096)
    c, = _params(7, dtype=torch.bfloat16)
    d, = _params(3)
    opt = CPUKernelAdamW([a, b, c, d], lr=0.1)
    _set_grads([a, b, c], 0)  # d has no gradient yet: skipped, no state
    opt.step()
    assert d not in opt.state
    f32, bf16 = (torch.float32,) * 3, (torch.bfloat16,) * 3
    assert launches == [(f32, [id(a), id(b)], 1.0), (bf16, [id(c)], 1.0)]
    launches.clear()
    _set_grads([a, b, c, d], 1)
    opt.step()  # d's first step: its bias corrections differ, so another launch
    assert sorted(launches, key=str) == sorted([(f32, [id(a), id(b)], 2.0), (f32, [id(d)], 1.0),
                                                (bf16, [id(c)], 2.0)], key=str)
    assert [float(opt.state[p]["step"]) for p in (a, b, c, d)] == [2.0, 2.0, 2.0, 1.0]
    assert ok.bucket_key(a, a.grad.bfloat16(), a, 2.0) != ok.bucket_key(a, a.grad, a, 2.0)  # grad dtype


@pytest.mark.parametrize("kind", ["misaligned", "strided"])
def test_tensors_the_kernel_cannot_address_go_to_torch(launches, kind):
    """A misaligned view goes through torch's fused kernel; a transposed one through torch's default
    (torch's fused kernel pairs elements by memory order, so a transposed parameter with a
    contiguous gradient would be updated with the wrong gradient elements)."""
    if kind == "misaligned":
        odd = torch.nn.Parameter(torch.randn(4 * 9 + 1)[1:])
        twin, torch_kwargs = torch.nn.Parameter(torch.randn(37)[1:]), {"fused": True}
    else:
        odd = torch.nn.Parameter(torch.randn(6, 4).t())
        twin, torch_kwargs = torch.nn.Parameter(torch.randn(6, 4).t()), {}
    twin.data.copy_(odd)
    aligned, = _params(10)
    ours, theirs = [aligned, odd], [_twins([aligned])[0], twin]
    a = CPUKernelAdamW(ours, lr=0.1, weight_decay=0.1)
    b = torch.optim.AdamW(theirs, lr=0.1, weight_decay=0.1, **torch_kwargs)
    for seed in range(3):
        _set_grads(ours, seed)
        _set_grads(theirs, seed)
        a.step()
        b.step()
    assert [ids for _, ids, _ in launches] == [[id(aligned)]] * 3
    assert torch.equal(odd, twin) and torch.equal(a.state[odd]["exp_avg_sq"], b.state[twin]["exp_avg_sq"])
    assert a.state[odd]["step"].device.type == "cpu" and float(a.state[odd]["step"]) == 3.0


def test_on_the_cpu_it_is_torch_fused_adamw_with_torchs_state_layout():
    ours = _params(5, (3, 4), 0, dtype=torch.float32) + _params(6, dtype=torch.bfloat16)
    theirs = _twins(ours)
    idle = torch.nn.Parameter(torch.ones(2))  # never gets a gradient
    groups = lambda ps, extra: [{"params": ps[:2] + extra, "weight_decay": 0.1},  # noqa: E731
                                {"params": ps[2:], "weight_decay": 0.0, "lr": 0.05}]
    a = ok.TritonAdamW(groups(ours, [idle]), lr=0.1, betas=(0.8, 0.9))
    b = torch.optim.AdamW(groups(theirs, []), lr=0.1, betas=(0.8, 0.9), fused=True)
    plain = torch.optim.AdamW(_twins(ours), lr=0.1)  # torch's default (non-fused) layout
    for seed in range(3):
        _set_grads(ours, seed)
        _set_grads(theirs, seed)
        _set_grads(plain.param_groups[0]["params"], seed)
        a.step()
        b.step()
        plain.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    assert idle not in a.state
    want = plain.state[plain.param_groups[0]["params"][0]]
    for p in ours:
        st = a.state[p]
        assert set(st) == set(want) == {"step", "exp_avg", "exp_avg_sq"}
        assert st["step"].shape == () and st["step"].dtype == want["step"].dtype == torch.float32
        assert st["step"].device.type == want["step"].device.type == "cpu" and float(st["step"]) == 3.0
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == p.dtype
        assert st["exp_avg"].shape == p.shape


def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("torch_kwargs", [{"fused": True}, {"foreach": True}, {}])
@pytest.mark.parametrize("first", ["triton", "torch"])
def test_state_dict_moves_both_ways(first, torch_kwargs):
    """Two steps in one optimizer, its state_dict (through torch.save) into the other, two more steps:
    the same weights and moments as four steps in one, within fp32 rounding (load_state_dict takes
    the saved groups' ``fused``/``foreach`` flags, so torch may switch implementation on the way)."""
    make = {"triton": lambda ps: ok.TritonAdamW(ps, lr=0.1, weight_decay=0.1),
            "torch": lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1, **torch_kwargs)}
    second = "torch" if first == "triton" else "triton"
    start = _params(5, (4, 3))
    straight_params = _twins(start)
    straight = make[first](straight_params)
    for seed in range(4):
        _set_grads(straight_params, seed)
        straight.step()
    head_params = _twins(start)
    head = make[first](head_params)
    for seed in range(2):
        _set_grads(head_params, seed)
        head.step()
    tail_params = _twins(head_params)
    tail = make[second](tail_params)
    tail.load_state_dict(_roundtrip(head.state_dict()))
    for seed in range(2, 4):
        _set_grads(tail_params, seed)
        tail.step()
    for p, q in zip(tail_params, straight_params):
        for x, y in [(p, q), (tail.state[p]["exp_avg"], straight.state[q]["exp_avg"]),
                     (tail.state[p]["exp_avg_sq"], straight.state[q]["exp_avg_sq"])]:
            torch.testing.assert_close(x, y, rtol=2e-6, atol=1e-8)
        assert float(tail.state[p]["step"]) == 4.0 and tail.state[p]["step"].device.type == "cpu"


def test_closure_runs_with_grad_and_hooks_run_once():
    p, = _params(4)
    opt = ok.TritonAdamW([p], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.requires_grad and calls == ["pre", "post"]
    assert float(opt.state[p]["step"]) == 1.0


def test_sparse_gradients_are_refused_like_torch():
    p, = _params(4)
    p.grad = torch.zeros(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        ok.TritonAdamW([p]).step()


def test_cuda_backend_offers_it_where_triton_imports():
    want = ok.TritonAdamW if ok.HAVE_TRITON else None
    assert create_backend("cuda").adamw_class() is want
    assert create_backend("cpu").adamw_class() is None


def test_master_weights_step_fp32_masters_and_write_bf16_params():
    """master_weights=True over bf16 parameters: the update is torch AdamW on fp32 masters with the
    bf16 gradients (clipping coefficient included), each parameter is its master rounded to bf16,
    and the state (master, moments) stays fp32."""
    params = _params((7, 5), (300,), dtype=torch.bfloat16, seed=3)
    masters = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = ok.TritonAdamW(params, lr=0.05, weight_decay=0.1, master_weights=True)
    ref = torch.optim.AdamW(masters, lr=0.05, weight_decay=0.1, fused=True)  # what it runs on the CPU
    for step, coef in enumerate((1.0, 0.5, 1.0)):
        _set_grads(params, seed=10 + step)
        for m, p in zip(masters, params):
            m.grad = p.grad.float() * coef
        opt.step(grad_coef=coef)
        ref.step()
        for p, m in zip(params, masters):
            assert torch.equal(opt.state[p]["master"], m.detach())
            assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))
            assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.float32


def test_master_weights_survive_state_dict_in_fp32():
    """Saved and loaded (torch would cast the state to the parameters' bf16), then stepped on: the
    same as never interrupted; a state without masters (another run's) starts them from the params."""
    def run(steps, resume=None):
        params = _params((33,), (4, 4), dtype=torch.bfloat16, seed=5)
        opt = ok.TritonAdamW(params, lr=0.01, master_weights=True)
        if resume is not None:
            weights, sd = resume
            for p, w in zip(params, weights):
                p.data.copy_(w)
            opt.load_state_dict(sd)
        for s in steps:
            _set_grads(params, seed=s)
            opt.step()
        return params, opt

    straight, _ = run(range(4))
    half, half_opt = run(range(2))
    buf = io.BytesIO()
    torch.save(half_opt.state_dict(), buf)
    buf.seek(0)
    resumed, resumed_opt = run(range(2, 4), resume=([p.detach().clone() for p in half], torch.load(buf)))
    for p, q in zip(resumed, straight):
        assert torch.equal(p, q)
        assert resumed_opt.state[p]["master"].dtype == torch.float32
    plain = _params((9,), dtype=torch.bfloat16, seed=1)
    opt = ok.TritonAdamW(plain, lr=0.01, master_weights=True)
    _set_grads(plain, seed=0)
    torch.optim.AdamW(plain, lr=0.01).step()  # a bf16 state, as another run would have saved
    sd = torch.optim.AdamW(plain, lr=0.01).state_dict()
    opt.load_state_dict(sd)
    opt.step()
    assert opt.state[plain[0]]["master"].dtype == torch.float32


def test_bf16_moments_on_the_torch_path_step_fp32_copies_and_store_rounded():
    """moment_dtype=bf16 where the kernel does not run (CPU, NPU): torch's AdamW on fp32 copies of
    the moments, stored back rounded to nearest bf16: bit for bit a reference that rounds its fp32
    moments after every step (the kernel's storage); the state dict keeps them bf16."""
    params = _params((7, 5), (300,), dtype=torch.bfloat16, seed=4)
    masters = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = ok.TritonAdamW(params, lr=0.05, weight_decay=0.1, master_weights=True, moment_dtype=torch.bfloat16)
    ref = torch.optim.AdamW(masters, lr=0.05, weight_decay=0.1, fused=True)
    for step in range(3):
        _set_grads(params, seed=20 + step)
        for m, p in zip(masters, params):
            m.grad = p.grad.float()
        opt.step()
        ref.step()
        for m in masters:  # the reference keeps its moments at bf16 values
            for key in ("exp_avg", "exp_avg_sq"):
                ref.state[m][key].copy_(ref.state[m][key].to(torch.bfloat16))
        for p, m in zip(params, masters):
            assert torch.equal(opt.state[p]["master"], m.detach())
            assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))
            for key in ("exp_avg", "exp_avg_sq"):
                assert opt.state[p][key].dtype == torch.bfloat16
                assert torch.equal(opt.state[p][key].float(), ref.state[m][key])
    again = ok.TritonAdamW(params, lr=0.05, master_weights=True, moment_dtype=torch.bfloat16)
    again.load_state_dict(opt.state_dict())
    assert again.state[params[0]]["exp_avg"].dtype == torch.bfloat16
    assert again.state[params[0]]["master"].dtype == torch.float32
    with pytest.raises(ValueError, match="master_weights"):
        ok.TritonAdamW(params, lr=0.1, moment_dtype=torch.bfloat16)


def test_master_weights_refuse_groups_the_kernel_lacks():
    with pytest.raises(ValueError, match="master_weights"):
        ok.TritonAdamW(_params((3,), dtype=torch.bfloat16), lr=0.1, amsgrad=True, master_weights=True)


def test_master_weights_launch_writes_the_params(launches, monkeypatch):
    """With CPU tensors let into the kernel path: one launch per group, masters as the updated
    tensors, the bf16 parameters handed over as the copies."""
    seen = []
    real = ok.launch_adamw

    def record(params, grads, exp_avgs, exp_avg_sqs, *, copies=None, **kw):
        seen.append(([p.dtype for p in params], [c.dtype for c in copies], [g.dtype for g in grads]))
        return real(params, grads, exp_avgs, exp_avg_sqs, **kw)

    monkeypatch.setattr(ok, "launch_adamw", record)
    params = _params((64,), (2048,), dtype=torch.bfloat16)
    opt = CPUKernelAdamW(params, lr=0.1, master_weights=True)
    _set_grads(params, seed=0)
    opt.step()
    assert seen == [([torch.float32] * 2, [torch.bfloat16] * 2, [torch.bfloat16] * 2)]


# ----------------------------------------------------------------- a coefficient on the device
def _dev(coef: float) -> torch.Tensor:
    return torch.tensor(coef, dtype=torch.float64)


MAKERS = {  # each one's tensors take another path on the CPU (the kernel takes CUDA tensors only)
    "fused": lambda: ok.TritonAdamW(_params(5, (3, 4), seed=2), lr=0.1, weight_decay=0.1),
    "master": lambda: ok.TritonAdamW(_params(5, (3, 4), dtype=torch.bfloat16, seed=2), lr=0.1,
                                     weight_decay=0.1, master_weights=True),
    "foreach": lambda: ok.TritonAdamW(_params(5, (3, 4), seed=2), lr=0.1, weight_decay=0.1, foreach=True),
    "amsgrad": lambda: ok.TritonAdamW(_params(5, (3, 4), seed=2), lr=0.1, amsgrad=True),
}


@pytest.mark.parametrize("path", sorted(MAKERS))
def test_device_coef_steps_as_the_float_and_skips_when_not_finite(path):
    """step(grad_coef=<float64 tensor>) on the CPU's torch paths: bit for bit the float coef's step
    (1 included: the float path then skips the multiply); a NaN or inf one writes nothing, not even
    the gradients, and undo_step() puts the state_dict back bitwise, from an empty one included
    (the first step). torch fused skips on found_inf; the foreach and amsgrad groups read the coef."""
    float_opt, dev_opt = MAKERS[path](), MAKERS[path]()
    ps, qs = float_opt.param_groups[0]["params"], dev_opt.param_groups[0]["params"]
    for bad in (float("nan"), float("inf")):
        _set_grads(qs, seed=0)
        before = snapshot(qs, dev_opt)
        dev_opt.step(grad_coef=_dev(bad))
        assert same(snapshot(qs, dev_opt)[0], before[0]), bad
        dev_opt.undo_step()
        assert same(snapshot(qs, dev_opt), before) and not dev_opt.state, bad
    for seed, coef in enumerate((0.37, 1.0, 0.123456789)):
        _set_grads(ps, seed)
        _set_grads(qs, seed)
        float_opt.step(grad_coef=coef)
        dev_opt.step(grad_coef=_dev(coef))
        assert same(snapshot(qs, dev_opt), snapshot(ps, float_opt)), coef
    before = snapshot(qs, dev_opt)
    dev_opt.step(grad_coef=_dev(float("nan")))
    assert same(snapshot(qs, dev_opt)[0], before[0])
    assert any(float(st["step"]) == 4.0 for st in dev_opt.state.values()) == (path in ("fused", "master"))
    dev_opt.undo_step()
    assert same(snapshot(qs, dev_opt), before)
    _set_grads(ps, seed=9)
    _set_grads(qs, seed=9)
    float_opt.step(grad_coef=0.5)
    dev_opt.step(grad_coef=_dev(0.5))  # the bias correction of step 4, not 5
    assert same(snapshot(qs, dev_opt), snapshot(ps, float_opt))


def test_takes_device_coef_says_where_a_step_would_read_it():
    """True where every tensor goes to the kernel or to torch's fused kernel (which skips on
    found_inf) with fp32/fp64 gradients; False where torch's foreach or for-loop code would take a
    group, or bf16 gradients would be scaled by torch on the CPU (the step then reads the coef)."""
    assert MAKERS["fused"]().takes_device_coef() and MAKERS["master"]().takes_device_coef()
    assert not MAKERS["foreach"]().takes_device_coef() and not MAKERS["amsgrad"]().takes_device_coef()
    assert ok.TritonAdamW(_params(5), amsgrad=True, fused=True).takes_device_coef()
    assert not ok.TritonAdamW(_params(5), fused=False).takes_device_coef()
    assert not ok.TritonAdamW(_params(5, dtype=torch.bfloat16)).takes_device_coef()
    assert CPUKernelAdamW(_params(5, dtype=torch.bfloat16)).takes_device_coef() == ok.HAVE_TRITON


def test_undo_step_follows_a_device_coef_step_once():
    opt = MAKERS["fused"]()
    _set_grads(opt.param_groups[0]["params"], seed=0)
    with pytest.raises(RuntimeError, match="undo_step"):
        opt.undo_step()
    opt.step(grad_coef=_dev(float("nan")))
    opt.undo_step()
    with pytest.raises(RuntimeError, match="undo_step"):
        opt.undo_step()
    opt.step(grad_coef=0.5)
    with pytest.raises(RuntimeError, match="undo_step"):  # a float step has no host half to take back
        opt.undo_step()


def test_a_device_coef_reaches_the_kernel_as_a_tensor(monkeypatch):
    seen = []
    monkeypatch.setattr(ok, "HAVE_TRITON", True)
    monkeypatch.setattr(ok, "launch_adamw", lambda *args, grad_coef, **kw: seen.append(grad_coef))
    params = _params(64, 2048)
    opt = CPUKernelAdamW(params, lr=0.1)
    _set_grads(params, seed=0)
    coef = _dev(0.25)
    opt.step(grad_coef=coef)
    assert len(seen) == 1 and seen[0] is coef
