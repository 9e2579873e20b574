"""Packing boundaries, the SFT loss mask (worked example), collation and padding sides."""

import numpy as np
import torch

from anymoe.data.collate import collate_lm, collate_preference, collate_prompts, count_loss_tokens
from anymoe.data.datasets import (
    IGNORE,
    DocumentLMDataset,
    PackedLMDataset,
    Sample,
    pack_samples,
    preference_pair,
    sft_example,
    token_stream,
)
from anymoe.data.tokenizers import ByteTokenizer

E = 258  # byte tokenizer eos


def test_stream_puts_eos_between_documents():
    tok = ByteTokenizer()
    docs = ["ab", "cde", "f"]
    stream = token_stream([tok.encode(d) for d in docs], E)
    assert stream.tolist() == [97, 98, E, 99, 100, 101, E, 102, E]
    # split back on eos: the documents, in order
    text = tok.decode(stream.tolist(), skip_special=False)
    assert text.split("<eos>")[:-1] == docs


def test_packed_rows_are_the_shifted_stream():
    # Worked example from datasets.py: S=4, docs "ab" "cde".
    stream = token_stream([[97, 98], [99, 100, 101]], E)
    ds = PackedLMDataset(stream, 4)
    assert len(ds) == 1
    assert list(ds[0].input_ids) == [97, 98, E, 99] and list(ds[0].labels) == [98, E, 99, 100]
    # Larger, random: every row is stream[i*S : i*S+S] -> stream[i*S+1 : i*S+S+1] (plain loop reference).
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, rng.integers(1, 30)).tolist() for _ in range(40)]
    stream = token_stream(docs, E)
    S = 16
    ds = PackedLMDataset(stream, S)
    assert len(ds) == (len(stream) - 1) // S
    for i in range(len(ds)):
        for t in range(S):
            assert ds[i].input_ids[t] == stream[i * S + t]
            assert ds[i].labels[t] == stream[i * S + t + 1]
    # the eos count inside rows equals the document boundaries they cover
    covered = stream[:len(ds) * S]
    in_rows = sum(int((np.asarray(ds[i].input_ids) == E).sum()) for i in range(len(ds)))
    assert in_rows == int((covered == E).sum())


def test_unpacked_rows_one_document_each():
    ds = DocumentLMDataset([[1, 2, 3], [4] * 10, []], E, seq_len=4)
    assert len(ds) == 2
    assert list(ds[0].input_ids) == [1, 2, 3] and list(ds[0].labels) == [2, 3, E]
    assert list(ds[1].input_ids) == [4, 4, 4, 4] and list(ds[1].labels) == [4, 4, 4, 4]  # truncated
    batch = collate_lm([ds[0], ds[1]], pad_id=256, seq_len=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 256], [4, 4, 4, 4]]
    assert batch["labels"].tolist() == [[2, 3, E, IGNORE], [4, 4, 4, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_sft_mask_worked_example():
    # prompt "12+3=" response "15": full = 1 2 + 3 = 1 5 E
    tok = ByteTokenizer()
    p, r = tok.encode("12+3="), tok.encode("15")
    s = sft_example(p, r, E, seq_len=32)
    assert list(s.input_ids) == p + r                   # 1 2 + 3 = 1 5
    assert list(s.labels) == [IGNORE] * 4 + r + [E]     # positions 0..3 predict prompt tokens: masked
    # position 4 is '=' and predicts '1' (first response token): learned
    assert s.input_ids[4] == ord("=") and s.labels[4] == ord("1")
    # reference: label t is full[t+1] exactly when full[t+1] is a response token or the eos
    full = p + r + [E]
    for t in range(len(full) - 1):
        assert s.labels[t] == (full[t + 1] if t + 1 >= len(p) else IGNORE)


def test_sft_truncation_and_prompt_too_long():
    s = sft_example([1, 2, 3], [4, 5, 6], E, seq_len=4)
    assert list(s.input_ids) == [1, 2, 3, 4] and list(s.labels) == [IGNORE, IGNORE, 4, 5]
    assert sft_example([1] * 10, [2], E, seq_len=4) is None  # no response token fits: dropped


def test_pack_samples_keeps_masks_and_never_splits():
    a = Sample([1, 2, 3], [IGNORE, 3, E])
    b = Sample([4, 5], [IGNORE, E])
    c = Sample([6, 7, 8, 9], [7, 8, 9, E])
    packed = pack_samples([a, b, c], seq_len=5)
    assert [list(p.input_ids) for p in packed] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert [list(p.labels) for p in packed] == [[IGNORE, 3, E, IGNORE, E], [7, 8, 9, E]]


def test_collate_padding_sides():
    batch = collate_prompts([[1, 2, 3], [4]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]  # left: last column = last prompt token
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    lm = collate_lm([Sample([1, 2, 3], [2, 3, E]), Sample([4], [E])], pad_id=0)
    assert lm["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]  # right
    assert lm["labels"].tolist() == [[2, 3, E], [E, IGNORE, IGNORE]]
    assert lm["input_ids"].dtype == torch.long and count_loss_tokens(lm["labels"]) == 4


def test_preference_collate_shares_one_length():
    tok = ByteTokenizer()
    pairs = [preference_pair(tok, "1+1=", "2", "11", 16), preference_pair(tok, "10+10=", "20", "3", 16)]
    b = collate_preference(pairs, tok.pad_id)
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == (2, 8)
    assert tok.decode(b["chosen_input_ids"][1].tolist()) == "10+10=20"  # input drops only the final eos
    got = [t for t in b["chosen_labels"][0].tolist() if t != IGNORE]
    assert got == tok.encode("2") + [E]
    got = [t for t in b["rejected_labels"][0].tolist() if t != IGNORE]
    assert got == tok.encode("11") + [E]
