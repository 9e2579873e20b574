"""The synthetic corpus and addition task: deterministic from the seed; shipped files = generator output."""

import json

import pytest

from anymoe.data import synthetic
from anymoe.data.config import SHIPPED_DIR
from anymoe.data.sources import split_documents


def test_corpus_is_deterministic_and_seeded():
    a = synthetic.generate_corpus(5, 20_000)
    assert a == synthetic.generate_corpus(5, 20_000)
    assert a != synthetic.generate_corpus(6, 20_000)
    assert 20_000 <= len(a.encode()) < 21_000 and a.isascii()
    docs = split_documents(a)
    assert len(docs) > 20 and all("\n" not in d for d in docs)


def test_corpus_facts_are_true():
    text = synthetic.generate_corpus(1, 50_000)
    words = text.replace("\n", " ").split(" ")
    checked = 0
    for i, w in enumerate(words):
        if w == "plus" and words[i + 2] == "is":
            assert int(words[i - 1]) + int(words[i + 1]) == int(words[i + 3].rstrip("."))
            checked += 1
        if "+" in w and "=" in w:
            lhs, rhs = w.rstrip(".").split("=")
            a, b = lhs.split("+")
            assert int(a) + int(b) == int(rhs)
            checked += 1
    assert checked > 50


@pytest.mark.parametrize("name", sorted(synthetic.SHIPPED))
def test_shipped_file_equals_generator_output(name):
    path = SHIPPED_DIR / name
    assert path.is_file(), f"{path} missing: run python -m anymoe.data.synthetic --write"
    assert path.read_text(encoding="utf-8") == synthetic.SHIPPED[name]()


def test_shipped_folder_is_small():
    assert sum(p.stat().st_size for p in SHIPPED_DIR.iterdir()) < 2_000_000
    assert synthetic.main(["--check"]) == 0


def test_addition_task():
    train = synthetic.addition_prompts(0, 1000, "train")
    evals = synthetic.addition_prompts(0, 200, "eval")
    assert train == synthetic.addition_prompts(0, 1000, "train")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    for row in train + evals:
        a, b = row["prompt"][:-1].split("+")
        assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99 and row["answer"] == str(int(a) + int(b))
    sft = synthetic.addition_sft(0, 300)
    assert not {r["prompt"] for r in sft} & {r["prompt"] for r in evals}
    assert all(eval(r["prompt"][:-1]) == int(r["response"]) for r in sft)


def test_preferences_are_learnable():
    rows = synthetic.addition_preferences(0, 500)
    for r in rows:
        right = eval(r["prompt"][:-1])
        assert int(r["chosen"]) == right and int(r["rejected"]) != right and int(r["rejected"]) >= 0
    line = (SHIPPED_DIR / "addition_preferences.jsonl").read_text().splitlines()[0]
    assert set(json.loads(line)) == {"prompt", "chosen", "rejected"}
