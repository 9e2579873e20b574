"""`train.compile`: regional torch.compile of the decoder blocks (anymoe/trainers/compile.py).

On the CPU the default run compiles with torch.compile's "aot_eager" backend (dynamo tracing
and the AOT autograd graphs, no code generation; seconds instead of the ~30 s Inductor needs
here), through the trainer's ``_compiler`` knob; the Inductor run is marked slow. CUDA graphs
and the bf16 grouped GEMM path are GPU-marked.
"""

import json
import shutil

import pytest
import torch
import yaml
from torch._dynamo.utils import counters

from anymoe.backends.cpu import CPUBackend
from anymoe.backends.cuda import CUDABackend
from anymoe.backends.npu import NPUBackend
from anymoe.cli import main
from anymoe.core.backend import probe_backends
from anymoe.core.config import ConfigError
from anymoe.core.grouped_mm import grouped_mm_loop
from anymoe.trainers.compile import check_backend, compile_blocks
from anymoe.trainers.config import config_from_data
from anymoe.trainers.metrics import read_metrics
from anymoe.trainers.pretrain import PretrainTrainer

CFG = {
    "name": "compile",
    "model": {"preset": "tiny", "vocab_size": 259, "d_model": 32, "max_seq_len": 32,
              "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 48,
                      "balance": {"aux_loss": 0.01, "z_loss": 0.001}}},
    "data": {"format": "text", "path": "shipped:tiny_corpus.txt", "seq_len": 32, "eval_split": 0.02},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
    "train": {"steps": 4, "micro_batch": 2, "global_batch": 4, "precision": "fp32", "host_threads": 1},
    "logging": {"progress": False, "plots": False, "tensorboard": False},
    "checkpoint": {"every": 0, "at_end": False},
    "eval": {"every": 2, "batches": 1},
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with no compiled graphs and zeroed counters (graphs of earlier models
    would count against the recompile limit and the graph-break counter)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(PretrainTrainer, "_compiler", "aot_eager")


def _write(tmp_path, **sections):
    data = json.loads(json.dumps(CFG))
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(cfg, run_dir, *args, backend="cpu"):
    assert main(["train", str(cfg), "--out", str(run_dir), "--backend", backend, *args]) == 0
    return {r["step"]: r for r in read_metrics(run_dir)}


def _assert_same_run(a, b, rel):
    assert sorted(a) == sorted(b)
    for step in a:
        for key in ("loss", "grad_norm", "aux_loss", "eval_loss"):
            if key in a[step]:
                assert b[step][key] == pytest.approx(a[step][key], rel=rel), (step, key)


# ------------------------------------------------------------------ the trainer option, CPU


def test_compiled_blocks_match_eager_as_one_graph(tmp_path, aot_eager):
    cfg = _write(tmp_path)
    eager = _run(cfg, tmp_path / "eager")
    compiled = _run(cfg, tmp_path / "compiled", "--set", "train.compile=blocks")
    _assert_same_run(eager, compiled, rel=1e-6)  # aot_eager: the same kernels, decomposed
    assert not counters["graph_break"], dict(counters["graph_break"])  # each block is one graph ...
    assert 1 <= counters["stats"]["unique_graphs"] <= 2  # ... shared by both blocks (train, eval)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_compile_with_activation_checkpointing(tmp_path, aot_eager, mode):
    cfg = _write(tmp_path, model={"checkpointing": mode})
    eager = _run(cfg, tmp_path / "eager")
    compiled = _run(cfg, tmp_path / "compiled", "--set", "train.compile=blocks")
    _assert_same_run(eager, compiled, rel=1e-6)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile_reaches_experts_under_lora(tmp_path, aot_eager):
    """LoRA wraps Experts (LoRAExperts.base): its grouped matmul must be swapped too."""
    cfg = _write(tmp_path, finetune={"mode": "lora"})
    eager = _run(cfg, tmp_path / "eager")
    compiled = _run(cfg, tmp_path / "compiled", "--set", "train.compile=blocks")
    _assert_same_run(eager, compiled, rel=1e-6)
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("first, then", [("blocks", "none"), ("none", "blocks")])
def test_checkpoint_moves_between_compiled_and_eager(tmp_path, aot_eager, first, then):
    cfg = _write(tmp_path, checkpoint={"every": 2, "at_end": True, "keep_last": 3})
    run = tmp_path / "run"
    before = _run(cfg, run, "--set", f"train.compile={first}")
    saved = torch.load(run / "checkpoints" / "step_00000002" / "model.pt", weights_only=True)
    from anymoe.models.transformer import MoETransformer

    eager_keys = MoETransformer(config_from_data(json.loads(json.dumps(CFG))).model).state_dict()
    assert list(saved) == list(eager_keys)  # no "_orig_mod." anywhere
    shutil.rmtree(run / "checkpoints" / "step_00000004")  # resume from step 2 ...
    after = _run(cfg, run, "--resume", "--set", f"train.compile={then}")  # ... in the other mode
    _assert_same_run(before, after, rel=1e-6)


@pytest.mark.slow
def test_inductor_blocks_match_eager_on_the_cpu(tmp_path):
    """The shipped compiler (Inductor, C++ code generation; ~30 s on a 2-core host)."""
    cfg = _write(tmp_path)
    eager = _run(cfg, tmp_path / "eager")
    compiled = _run(cfg, tmp_path / "compiled", "--set", "train.compile=blocks")
    _assert_same_run(eager, compiled, rel=1e-5)  # fused kernels sum in another order
    assert not counters["graph_break"], dict(counters["graph_break"])


# ------------------------------------------------------------------ compile_blocks itself


def test_compile_blocks_in_place_keeps_keys_and_swaps_the_grouped_mm():
    from anymoe.models.presets import preset
    from anymoe.models.transformer import MoETransformer

    backend = CPUBackend()
    model = MoETransformer(preset("tiny"), backend=backend)
    keys = list(model.state_dict())
    assert compile_blocks(model, backend, "blocks", compiler="aot_eager") == len(model.blocks)
    assert list(model.state_dict()) == keys
    limits = torch._dynamo.config
    assert getattr(limits, "recompile_limit", getattr(limits, "cache_size_limit", 0)) >= 8 * len(model.blocks)
    for layer in model.moe_layers():
        assert layer.experts.grouped_mm == backend.traceable_grouped_mm()
    assert compile_blocks(model, backend, "none") == 0
    with pytest.raises(ValueError, match="Inductor mode"):
        compile_blocks(model, backend, "blocks_cudagraphs", compiler="aot_eager")


@pytest.mark.parametrize("mode, parts", [("full", ["_forward"]),
                                         ("selective", ["_norm_attn", "_dense", "_moe"])])
def test_checkpointed_blocks_compile_what_the_checkpoint_recomputes(mode, parts):
    """With activation checkpointing the checkpoint call stays eager (Inductor on torch 2.11
    failed on a checkpoint traced into the block's graph); the recomputed parts are compiled,
    and gradients match the eager model."""
    from anymoe.models.presets import preset
    from anymoe.models.transformer import MoETransformer

    backend = CPUBackend()
    torch.manual_seed(0)
    cfg = preset("tiny", checkpointing=mode)
    eager, model = MoETransformer(cfg, backend=backend), MoETransformer(cfg, backend=backend)
    model.load_state_dict(eager.state_dict())
    compile_blocks(model, backend, "blocks", compiler="aot_eager")
    for block in model.blocks:
        assert block._compiled_call_impl is None  # the block itself is not one graph ...
        for name in parts:  # ... what its checkpoint recomputes is
            assert name in vars(block) and hasattr(vars(block)[name], "_torchdynamo_orig_callable")
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    for m in (eager, model):
        out = m(ids, return_aux=True)
        (out.logits.float().square().mean() + out.aux_loss).backward()
    for (name, a), b in zip(eager.named_parameters(), model.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7, msg=name)


def _attention_key_heads(device: str) -> tuple[list[int], int]:
    """Compile the tiny preset's blocks (grouped-query attention) with a backend that records the
    traced forward graphs; the head count of the key each attention call reads, and G."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from anymoe.core.backend import get_backend
    from anymoe.models.presets import preset
    from anymoe.models.transformer import MoETransformer

    heads: list[int] = []

    def record(gm, _inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "scaled_dot_product" in str(node.target) \
                    and "backward" not in str(node.target):
                heads.append(node.args[1].meta["val"].shape[1])
        return make_boxed_func(gm.forward)

    backend = get_backend(device)
    cfg = preset("tiny")
    assert cfg.n_heads > cfg.kv_heads  # grouped-query attention
    # bf16 on CUDA: the dtype of the fused attention kernels (float32 takes SDPA's math path)
    model = MoETransformer(cfg, backend=backend).to(device, torch.bfloat16 if device == "cuda" else None)
    compile_blocks(model, backend, "blocks", compiler=aot_autograd(fw_compiler=record, bw_compiler=record))
    was = torch.are_deterministic_algorithms_enabled()  # on CUDA it picks FlexAttention (test_attention.py)
    torch.use_deterministic_algorithms(False)
    try:
        model(torch.randint(0, cfg.vocab_size, (2, 16), device=device)).float().sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    return heads, cfg.kv_heads


def test_compiled_attention_reads_the_kv_heads_without_a_repeat():
    """The compiled graph hands SDPA the G key/value heads (enable_gqa), never a materialised
    repeat: on torch 2.11 a tracer-state guess put one into every compiled step."""
    heads, groups = _attention_key_heads("cpu")
    assert heads and set(heads) == {groups}, heads


@pytest.mark.gpu
def test_compiled_attention_reads_the_kv_heads_without_a_repeat_on_cuda():
    _cuda_or_skip()
    heads, groups = _attention_key_heads("cuda")
    assert heads and set(heads) == {groups}, heads


def test_config_refuses_cudagraphs_with_activation_checkpointing():
    data = _cfg(compile="blocks_cudagraphs")
    data["model"] = {**data["model"], "checkpointing": "full"}
    with pytest.raises(ConfigError) as err:
        config_from_data(data)
    assert err.value.field == "train.compile"
    assert "model.checkpointing" in str(err.value) and "train.compile: blocks" in str(err.value)
    data["train"]["compile"] = "blocks"
    assert config_from_data(data).model.checkpointing == "full"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_traceable_grouped_mm_is_one_graph_and_matches_the_loop(dtype):
    """Forward and both gradients against the float64 loop, under fullgraph=True (a graph
    break would raise); counts [3, 0, 4, 1]: expert 1 has no rows."""
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([3, 0, 4, 1])
    x = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 16, 12, generator=gen, dtype=torch.float64)
    g = torch.randn(8, 12, generator=gen, dtype=torch.float64)
    fn = torch.compile(CPUBackend().traceable_grouped_mm(), backend="aot_eager", fullgraph=True)
    xr, wr = x.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
    y = fn(xr, wr, counts)
    y.backward(g.to(dtype))
    xd, wd = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = grouped_mm_loop(xd, wd, counts)
    ref.backward(g)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(xr.grad.double(), xd.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(wr.grad.double(), wd.grad, atol=tol, rtol=tol)
    assert wr.grad[1].abs().sum() == 0  # no rows, no gradient


# ------------------------------------------------------------------ validation


def _cfg(**train):
    data = json.loads(json.dumps(CFG))
    data["train"].update(train)
    return data


@pytest.mark.parametrize("change, words", [
    ({"engine": "deepspeed"}, ["engine: deepspeed", "train.compile: none"]),
    ({"parallel": {"ep": 2}}, ["parallel.ep", "train.compile: none"]),
    ({"data": {"format": "text", "path": "shipped:tiny_corpus.txt", "packing": False}},
     ["data.packing false", "data.packing: true", "train.compile: blocks"]),
])
def test_config_refuses_unsafe_combinations(change, words):
    data = _cfg(compile="blocks_cudagraphs")
    data.update(change)
    with pytest.raises(ConfigError) as err:
        config_from_data(data)
    assert err.value.field == "train.compile"
    for word in words:
        assert word in str(err.value)


SFT = {"format": "sft", "path": "shipped:addition_sft.jsonl", "seq_len": 32}


def test_config_refuses_cudagraphs_on_sft_rows():
    data = _cfg(compile="blocks_cudagraphs")
    data["data"] = dict(SFT)
    with pytest.raises(ConfigError) as err:
        config_from_data(data)
    assert err.value.field == "train.compile" and "data.format sft" in str(err.value)


def test_config_accepts_the_modes_that_can_work():
    assert config_from_data(_cfg(compile="blocks_cudagraphs")).train.compile == "blocks_cudagraphs"
    sft = _cfg(compile="blocks")  # variable-length rows are fine without CUDA graphs
    sft["data"] = dict(SFT)
    assert config_from_data(sft).train.compile == "blocks"
    with pytest.raises(ConfigError, match="must be one of"):
        config_from_data(_cfg(compile="block"))


def test_each_backend_says_which_modes_it_runs():
    assert CPUBackend().compile_modes() == ("none", "blocks")
    assert CUDABackend().compile_modes() == ("none", "blocks", "blocks_cudagraphs")
    assert NPUBackend().compile_modes() == ("none",)
    with pytest.raises(ConfigError) as err:
        check_backend("blocks", NPUBackend())
    assert err.value.field == "train.compile" and "backend 'npu'" in str(err.value)
    assert "set train.compile to one of those" in str(err.value)
    check_backend("blocks", CPUBackend())


def test_cli_refuses_cudagraphs_on_the_cpu_before_any_step(tmp_path, capsys):
    cfg = _write(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--backend", "cpu",
                 "--set", "train.compile=blocks_cudagraphs"]) == 2
    err = capsys.readouterr().err
    assert "train.compile" in err and "'blocks_cudagraphs' is not available on backend 'cpu'" in err
    assert not (run / "metrics.jsonl").exists()


# ------------------------------------------------------------------ GPU


def _cuda_or_skip():
    status = probe_backends().get("cuda")
    if status is None or not status.ok:
        pytest.skip(f"backend 'cuda' not usable here: {status.reason if status else 'not registered'}")


GPU = {"model": {"d_model": 64, "max_seq_len": 64, "moe": {"num_experts": 8, "top_k": 2, "expert_hidden": 64,
                                                           "balance": {"aux_loss": 0.01, "z_loss": 0.001}}},
       "data": {"format": "text", "path": "shipped:tiny_corpus.txt", "seq_len": 64, "eval_split": 0.02},
       "train": {"steps": 6, "micro_batch": 4, "global_batch": 8, "precision": "bf16"}}


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["blocks", "blocks_cudagraphs"])
def test_compiled_blocks_match_eager_on_cuda(tmp_path, mode):
    """bf16, 2 micro-batches per step (CUDA-graph outputs copied before the next replay), an
    eval (the no-grad graphs); the experts' grouped GEMM is torch._grouped_mm in the graph."""
    _cuda_or_skip()
    cfg = _write(tmp_path, **GPU)
    eager = _run(cfg, tmp_path / "eager", backend="cuda")
    compiled = _run(cfg, tmp_path / mode, "--set", f"train.compile={mode}", backend="cuda")
    _assert_same_run(eager, compiled, rel=2e-2)  # bf16: fused kernels round differently
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.gpu
def test_cuda_traceable_grouped_mm_is_one_graph_in_bf16():
    _cuda_or_skip()
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([3, 0, 4, 1], device="cuda")
    x = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 16, 24, generator=gen, dtype=torch.float64)
    fn = torch.compile(CUDABackend().traceable_grouped_mm(), backend="aot_eager", fullgraph=True)
    xr = x.to("cuda", torch.bfloat16).requires_grad_()
    wr = w.to("cuda", torch.bfloat16).requires_grad_()
    y = fn(xr, wr, counts)
    y.float().sum().backward()
    ref = grouped_mm_loop(xr.detach().double().cpu(), wr.detach().double().cpu(), counts.cpu())
    torch.testing.assert_close(y.double().cpu(), ref, atol=3e-2, rtol=3e-2)
    assert xr.grad is not None and wr.grad is not None


def _host_syncs_of_one_step(tmp_path, accum):
    """cudaStreamSynchronize / cudaDeviceSynchronize calls during one (warm) training step."""
    from torch.profiler import ProfilerActivity, profile

    from anymoe.core.backend import get_backend

    data = json.loads(json.dumps(CFG))
    for key, value in GPU.items():
        data[key].update(value)
    data["train"].update(steps=3, global_batch=4 * accum)
    trainer = PretrainTrainer(config_from_data(data), tmp_path / f"accum{accum}", get_backend("cuda"))
    trainer.build()
    trainer.train_step(0)  # warm: dtype probes, allocator
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.train_step(1)
    names = ("cudaStreamSynchronize", "cudaDeviceSynchronize")
    return sum(e.count for e in prof.key_averages() if e.key in names)


@pytest.mark.gpu
def test_micro_batches_add_no_host_reads(tmp_path):
    """A micro-batch costs at most the two blocking host-to-device copies of its ids and labels
    (done at the start of the step); the statistics come back once per step, not per micro-batch."""
    _cuda_or_skip()
    two, six = _host_syncs_of_one_step(tmp_path, 2), _host_syncs_of_one_step(tmp_path, 6)
    assert six - two <= 2 * 4, (two, six)


# ------------------------------------------------------------------ auto


def _resolved(backend_name, **changes):
    from anymoe.core.backend import create_backend
    from anymoe.trainers.compile import resolve_compile_mode

    data = _cfg(compile="auto")
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return resolve_compile_mode(config_from_data(data), create_backend(backend_name))


def test_auto_takes_the_backends_best_mode_that_the_config_allows():
    """One config file: CUDA graphs where the backend prefers them and shapes are fixed, plain
    blocks where they are not, eager where compiling does not pay (CPU) or is not proven (NPU).
    The CUDA and NPU backend objects answer without their devices (create_backend: unchecked)."""
    assert _resolved("cuda") == "blocks_cudagraphs"
    assert _resolved("cuda", data=dict(SFT)) == "blocks"
    assert _resolved("cuda", model={"checkpointing": "full"}) == "blocks"
    assert _resolved("cuda", parallel={"ep": 2}) == "none"
    assert _resolved("cpu") == "none"
    assert _resolved("npu") == "none"


def test_auto_on_the_cpu_trains_eager(tmp_path):
    cfg = _write(tmp_path)
    eager = _run(cfg, tmp_path / "eager")
    auto = _run(cfg, tmp_path / "auto", "--set", "train.compile=auto")
    _assert_same_run(eager, auto, rel=0)
    assert not counters["stats"]["unique_graphs"]  # nothing was compiled
