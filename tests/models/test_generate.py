"""Generation: KV-cache decoding equals full recomputation, left padding equals running alone,
log-probs and routing match a plain forward, sampling filters behave as specified."""

import pytest
import torch

from anymoe.core.config import ConfigError, load_config
from anymoe.models import ModelConfig, MoETransformer
from anymoe.models.generate import generate, left_pad, process_logits

PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 12, 4], [11]]  # three lengths


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = load_config(
        ModelConfig,
        {
            "vocab_size": 48,
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32, "shared_experts": 1},
        },
        "model",
    )
    return MoETransformer(cfg).eval()


def test_cached_equals_uncached_greedy(model):
    a = generate(model, PROMPTS, 12, pad_id=0, use_cache=True)
    b = generate(model, PROMPTS, 12, pad_id=0, use_cache=False)
    assert a.tokens.shape == (3, 12)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_equals_each_prompt_alone(model):
    batch = generate(model, PROMPTS, 8)
    for b, p in enumerate(PROMPTS):
        alone = generate(model, [p], 8)
        assert torch.equal(batch.tokens[b], alone.tokens[0]), b
        torch.testing.assert_close(batch.logprobs[b], alone.logprobs[0], rtol=1e-5, atol=1e-5)


def test_logprobs_and_routing_match_a_full_forward(model):
    out = generate(model, PROMPTS, 6, return_routing=True)
    seqs = out.sequences()
    for b, seq in enumerate(seqs):
        full = model(torch.tensor([seq]), return_aux=True)
        logp = torch.log_softmax(full.logits[0].float(), -1)
        P = len(PROMPTS[b])
        want = logp[P - 1 : -1].gather(-1, torch.tensor(seq[P:])[:, None]).squeeze(-1)
        torch.testing.assert_close(out.logprobs[b], want, rtol=1e-5, atol=1e-5)
        # Routing of the real positions (after the left pads) equals the full forward's choice.
        pad = out.prompt.shape[1] - P
        for n, aux in enumerate(full.moe_aux):
            got = out.routing[n][b, pad:].sort(-1).values
            assert torch.equal(got, aux.expert_ids.sort(-1).values), (b, n)
    assert out.routing[0].shape == (3, out.prompt.shape[1] + 6, 2)


def test_stop_tokens_end_rows(model):
    first = generate(model, PROMPTS, 1).tokens[:, 0]
    stop = int(first[0])
    out = generate(model, PROMPTS, 5, stop_tokens=[stop], pad_id=47)
    assert out.finished[0] and out.lengths[0] == 1
    assert (out.tokens[0, 1:] == 47).all() and (out.logprobs[0, 1:] == 0).all()
    for b in range(3):
        row = out.tokens[b, : out.lengths[b]].tolist()
        assert stop not in row[:-1]


def test_sampling_is_seeded_and_filters_reduce_to_greedy(model):
    greedy = generate(model, PROMPTS, 6)
    assert torch.equal(generate(model, PROMPTS, 6, temperature=1.0, top_k=1, seed=3).tokens, greedy.tokens)
    assert torch.equal(generate(model, PROMPTS, 6, temperature=0.7, top_p=1e-6, seed=3).tokens, greedy.tokens)
    s1 = generate(model, PROMPTS, 6, temperature=1.3, top_p=0.9, top_k=20, seed=7)
    s2 = generate(model, PROMPTS, 6, temperature=1.3, top_p=0.9, top_k=20, seed=7)
    assert torch.equal(s1.tokens, s2.tokens)


def test_process_logits_worked_example():
    # probs 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7, then 0.8 >= 0.7 stops).
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = process_logits(logits, 1.0, 0, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert process_logits(logits, 1.0, 3, 1.0).isfinite().tolist() == [[True, True, True, False]]
    ids, mask = left_pad([[1, 2], [3]], pad_id=9)
    assert ids.tolist() == [[1, 2], [9, 3]] and mask.tolist() == [[1, 1], [0, 1]]


def test_bad_settings_name_the_field(model):
    with pytest.raises(ConfigError) as err:
        generate(model, PROMPTS, 4, top_p=0.0)
    assert err.value.field == "top_p"
