"""Checkpoint manager (atomic folders, keep-last-N, checksums) and the canonical optimizer state."""

import pytest
import torch

from anymoe.core.backend import get_backend
from anymoe.core.sizing import POW2
from anymoe.models import MoETransformer, preset
from anymoe.trainers.checkpoint import (
    CheckpointError,
    CheckpointManager,
    canonical_optim_state,
    load_canonical_optim_state,
    probe_writable,
)
from anymoe.trainers.optim import OptimConfig, build_optimizer


def test_keep_last_and_manifest(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        m.save(step, {"a.pt": {"x": torch.full((3,), float(step))}}, meta={"k": step})
    assert [p.name for p in m.finished()] == ["step_00000002", "step_00000003"]
    assert m.manifest(m.latest_valid())["meta"] == {"k": 3}
    assert torch.equal(m.load(m.latest_valid(), "a.pt")["x"], torch.full((3,), 3.0))
    # A stale temp folder (a killed write) is ignored by readers and replaced by the next write.
    (tmp_path / ".tmp-step_00000004").mkdir()
    (tmp_path / ".tmp-step_00000004" / "a.pt").write_bytes(b"junk")
    assert m.latest_valid().name == "step_00000003"
    m.save(4, {"a.pt": {"x": torch.zeros(1)}})
    assert not (tmp_path / ".tmp-step_00000004").exists()


def test_missing_manifest_and_missing_file(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=5)
    m.save(1, {"a.pt": {"x": torch.zeros(2)}, "b.pt": {"y": torch.ones(2)}})
    m.save(2, {"a.pt": {"x": torch.zeros(2)}, "b.pt": {"y": torch.ones(2)}})
    (tmp_path / "step_00000002" / "b.pt").unlink()
    assert "missing" in m.verify(tmp_path / "step_00000002")
    (tmp_path / "step_00000001" / "manifest.json").unlink()
    assert "did not finish" in m.verify(tmp_path / "step_00000001")
    assert m.latest_valid() is None
    with pytest.raises(CheckpointError, match="same --nproc"):
        m.load(tmp_path / "step_00000002", "rank00003.pt")


def test_probe_rejects_a_file_as_directory(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="cannot create the output directory"):
        probe_writable(f / "run")


def _trained(sizing, steps=2):
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=64, d_model=16, moe={"num_experts": 4, "top_k": 2, "expert_hidden": 24})
    model = MoETransformer(cfg, backend=get_backend("cpu", sizing=sizing))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), get_backend("cpu"))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        out = model(ids, return_aux=True)
        (out.logits.float().logsumexp(-1).mean() + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_optimizer_state_moves_from_pow2_to_identity():
    padded, opt_p = _trained(POW2)
    plain, opt_i = _trained(None, steps=0)
    canon = canonical_optim_state(padded, opt_p)
    w1 = next(k for k in canon["state"] if k.endswith("experts.w1"))
    assert canon["state"][w1]["exp_avg"].shape[-1] == 24  # unpadded
    plain.load_state_dict(padded.state_dict())
    load_canonical_optim_state(plain, opt_i, canon)
    back = canonical_optim_state(plain, opt_i)
    for name, st in canon["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(back["state"][name][k])), (name, k)
    # ... and back into a padded model: the pad of the moments is zero.
    again, opt_a = _trained(POW2, steps=0)
    again.load_state_dict(plain.state_dict())
    load_canonical_optim_state(again, opt_a, back)
    p = dict(again.named_parameters())[w1]
    assert p.shape[-1] == 32 and torch.all(opt_a.state[p]["exp_avg"][..., 24:] == 0)


def test_optimizer_state_from_another_model_is_refused():
    model, opt = _trained(None, steps=1)
    canon = canonical_optim_state(model, opt)
    canon["state"]["not.a.param"] = {}
    with pytest.raises(CheckpointError, match="lacks"):
        load_canonical_optim_state(model, opt, canon)
