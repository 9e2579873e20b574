"""build_data for every format, eval batches equal over DP sizes, and the shipped RL/preference sets."""

import json

import pytest
import torch

from anymoe.core.config import ConfigError, load_config
from anymoe.data import IGNORE, DataConfig, build_data
from anymoe.data.collate import count_loss_tokens


def _cfg(**kw):
    return load_config(DataConfig, kw, "data")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_shipped_corpus_trains_out_of_the_box():
    data = build_data(_cfg(eval_split=0.02))
    assert len(data.train) > 5000 and len(data.eval) > 50
    batch = data.train_stream(16).next_batch()
    assert batch["input_ids"].shape == batch["labels"].shape == (16, 128)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])  # labels are the shifted inputs
    assert (batch["labels"] != IGNORE).all()


def test_streams_of_all_dp_sizes_give_the_same_global_batches():
    data = build_data(_cfg(format="synthetic", path="", synthetic_bytes=20_000, seq_len=32))
    gb = 8
    for dp in (1, 2, 4):
        ref = data.train_stream(gb)
        ranks = [data.train_stream(gb, r, dp) for r in range(dp)]
        for _ in range(5):
            want = ref.next_batch()["input_ids"]
            got = torch.cat([s.next_batch()["input_ids"] for s in ranks])
            assert torch.equal(got, want)


def test_eval_split_fraction_is_disjoint_and_seeded():
    a = build_data(_cfg(format="synthetic", path="", synthetic_bytes=20_000, eval_split=0.1))
    b = build_data(_cfg(format="synthetic", path="", synthetic_bytes=20_000, eval_split=0.1))
    assert len(a.eval) > 0 and len(a.eval) == len(b.eval)
    assert all(list(a.eval[i].input_ids) == list(b.eval[i].input_ids) for i in range(len(a.eval)))
    train_rows = {tuple(a.train[i].input_ids) for i in range(len(a.train))}
    assert not any(tuple(a.eval[i].input_ids) in train_rows for i in range(len(a.eval)))


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_eval_batches_same_loss_tokens_for_every_dp_size(tmp_path, dp):
    rows = [{"prompt": f"{i}+{i}=", "response": str(2 * i)} for i in range(11)]
    cfg = _cfg(format="sft", path=_jsonl(tmp_path / "t.jsonl", rows),
               eval_split=_jsonl(tmp_path / "e.jsonl", rows), packing=False)
    data = build_data(cfg)
    per_rank = [list(data.eval_batches(4, r, dp)) for r in range(dp)]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of batches
    total = sum(count_loss_tokens(b["labels"]) for batches in per_rank for b in batches)
    assert total == sum(len(str(2 * i)) + 1 for i in range(11))


def test_sft_keys_and_separator_agree(tmp_path):
    rows = [{"prompt": "Q: 2+2?\nA:", "response": " 4"}, {"prompt": "Q: 3+4?\nA:", "response": " 7"}]
    keys = build_data(_cfg(format="sft", path=_jsonl(tmp_path / "k.jsonl", rows), packing=False,
                           shuffle=False))
    sep_rows = [{"text": r["prompt"] + r["response"]} for r in rows]
    sep = build_data(_cfg(format="sft", path=_jsonl(tmp_path / "s.jsonl", sep_rows), prompt_split="\nA:",
                          packing=False, shuffle=False))
    a, b = keys.train_stream(2).next_batch(), sep.train_stream(2).next_batch()
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    learned = [t for t in a["labels"][0].tolist() if t != IGNORE]
    assert keys.tokenizer.decode(learned) == " 4"


def test_sft_packing_fills_rows(tmp_path):
    rows = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(40)]
    data = build_data(_cfg(format="sft", path=_jsonl(tmp_path / "p.jsonl", rows), seq_len=32))
    assert len(data.train) < 40 and all(len(s.input_ids) <= 32 for s in data.train.samples)
    n_loss = sum(sum(t != IGNORE for t in s.labels) for s in data.train.samples)
    assert n_loss == sum(len(str(i + 1)) + 1 for i in range(40))


def test_bad_rows_name_the_key_field(tmp_path):
    with pytest.raises(ConfigError, match="no field 'response'") as info:
        build_data(_cfg(format="sft", path=_jsonl(tmp_path / "a.jsonl", [{"prompt": "x", "answer": "y"}])))
    assert info.value.field == "data.output_key"
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ConfigError, match=r"b.jsonl:2 is not valid JSON") as info:
        build_data(_cfg(format="jsonl", path=str(bad)))
    assert info.value.field == "data.path"
    with pytest.raises(ConfigError, match="not found") as info:
        build_data(_cfg(format="sft", path=_jsonl(tmp_path / "c.jsonl", [{"text": "no sep"}]),
                        prompt_split="##"))
    assert info.value.field == "data.prompt_split"
    with pytest.raises(ConfigError, match="no complete training sample") as info:
        build_data(_cfg(format="jsonl", path=_jsonl(tmp_path / "d.jsonl", [{"text": "hi"}])))
    assert info.value.field == "data.path"


def test_shipped_preferences_and_prompts():
    pref = build_data(_cfg(format="preference", path="shipped:addition_preferences.jsonl", seq_len=16,
                           eval_split=0.1))
    assert len(pref.train) == 1800 and len(pref.eval) == 200
    b = pref.train_stream(4).next_batch()
    keys = ("input_ids", "labels", "attention_mask")
    assert set(b) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in keys}
    prompts = build_data(_cfg(format="prompts", path="shipped:addition_prompts.jsonl",
                              eval_split="shipped:addition_prompts_eval.jsonl", seq_len=16))
    batch = prompts.train_stream(8).next_batch()
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padded
    for item, row in zip(batch["items"], batch["input_ids"]):
        a, b = item.prompt[:-1].split("+")
        assert item.answer == str(int(a) + int(b))
        assert prompts.tokenizer.decode(row.tolist()) == item.prompt
    eval_prompts = {it.prompt for it in prompts.eval.samples}
    assert len(eval_prompts) == 200 and not eval_prompts & {it.prompt for it in prompts.train.samples}


def test_jsonl_text_and_unpacked(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "hello"}, {"text": "a longer document here"}])
    data = build_data(_cfg(format="jsonl", path=path, packing=False, seq_len=8, shuffle=False))
    b = data.train_stream(2).next_batch()
    assert data.tokenizer.decode(b["input_ids"][0].tolist()) == "hello"
    assert b["labels"][0].tolist()[:6] == [*data.tokenizer.encode("ello"), data.tokenizer.eos_id, IGNORE]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_eval_row_valid_counts_every_pair_once(dp):
    data = build_data(_cfg(format="preference", path="shipped:addition_preferences.jsonl", seq_len=16,
                           eval_split=0.0053))  # 11 held-out pairs: the last batch of 4 needs filler for dp=4
    assert len(data.eval) == 11
    per_rank = [list(data.eval_batches(4, r, dp)) for r in range(dp)]
    assert len({len(b) for b in per_rank}) == 1
    assert sum(int(b["row_valid"].sum()) for bs in per_rank for b in bs) == 11
    for bs in per_rank:
        for b in bs:
            assert (b["chosen_labels"][~b["row_valid"]] == IGNORE).all()
