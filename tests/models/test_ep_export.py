"""A model trained at EP=2 (2 gloo processes, experts sharded) exports with its experts gathered:
transformers' Mixtral class and anymoe at EP=1 give the EP model's logits, and the checkpoint
loads back into an EP=2 model too."""

import pytest
import torch

from anymoe.core.config import load_config
from anymoe.core.launch import launch
from anymoe.models import ModelConfig

E = 4
CFG = {
    "vocab_size": 40,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "max_seq_len": 64,
    "moe": {
        "num_experts": E,
        "top_k": 2,
        "expert_hidden": 16,
        "router": {"normalize_topk": True},
        "balance": {"aux_loss": 0.01},
    },
}


def _cfg():
    return load_config(ModelConfig, CFG, "model")


def _ep_worker(rank: int, world: int, out_dir: str) -> dict:
    from anymoe.core.parallel import ParallelConfig, build_parallel_groups, sync_gradients
    from anymoe.models import MoETransformer, from_pretrained, save_pretrained

    groups = build_parallel_groups(ParallelConfig(ep=2, dispatcher="alltoall"), "cpu", num_experts=E)
    torch.manual_seed(0)
    model = MoETransformer(_cfg(), parallel=groups)
    assert model.blocks[0].ffn.experts.num_local == E // 2
    whole = MoETransformer(_cfg())  # every expert here: the same model size, total and active
    for active in (False, True):
        assert model.num_parameters(active) == whole.num_parameters(active) > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    for _ in range(3):
        ids = torch.randint(0, 40, (2, 12), generator=gen)
        out = model(ids, return_aux=True)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
        (loss + out.aux_loss).backward()
        sync_gradients(model, groups)
        opt.step()
        opt.zero_grad()
    model.eval()
    save_pretrained(model, f"{out_dir}/hf", format="hf")  # collective: experts gathered, rank 0 writes
    save_pretrained(model, f"{out_dir}/anymoe")
    probe = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(probe)
        torch.distributed.barrier()
        again = from_pretrained(f"{out_dir}/hf", parallel=groups).eval()  # loads this rank's slice
        back = again(probe)
    return {"logits": logits, "reloaded_diff": float((back - logits).abs().max()), "probe": probe}


@pytest.mark.multiproc
def test_ep2_trained_checkpoint_exports_gathered(tmp_path):
    transformers = pytest.importorskip("transformers")
    from anymoe.models import from_pretrained

    results = launch(_ep_worker, 2, args=(str(tmp_path),), timeout_s=240, start_method="fork")
    probe, logits = results[0]["probe"], results[0]["logits"]
    assert torch.allclose(results[1]["logits"], logits, atol=1e-6)
    assert max(r["reloaded_diff"] for r in results) <= 1e-5
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (hf(probe).logits - logits).abs().max().item() <= 1e-4
        for sub in ("hf", "anymoe"):
            single = from_pretrained(tmp_path / sub).eval()
            assert single.blocks[0].ffn.experts.num_local == E
            assert (single(probe) - logits).abs().max().item() <= 1e-5
