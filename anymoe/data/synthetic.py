"""A deterministic English-like corpus and the verifiable addition task, made from a seed.

Why synthetic: the main job must train out of the box on any machine with no download, and
the loss must visibly fall within a minute on two CPU cores. A small template grammar gives
text with structure a tiny model learns quickly (word order, agreement, closed word lists,
counting, arithmetic that is always right), written here, copied from nowhere.

Everything is a pure function of the seed (Python's ``random.Random``, whose ``choice`` /
``randint`` sequences are stable across Python 3 versions), so the shipped files in
``anymoe/data/shipped/`` can be re-made and checked byte for byte:

    python -m anymoe.data.synthetic --write     # regenerate the shipped files
    python -m anymoe.data.synthetic --check     # exit 1 if a shipped file differs
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

NAMES = ["anna", "ben", "carl", "dana", "emma", "finn", "grace", "hugo", "iris", "jack", "kate", "leo",
         "mia", "noah", "olga", "paul", "rosa", "sam", "tina", "umar", "vera", "will", "yara", "zoe"]
ANIMALS = ["cat", "dog", "bird", "fox", "horse", "mouse", "rabbit", "goat", "duck", "frog", "sheep", "bear"]
THINGS = ["ball", "book", "cup", "box", "hat", "lamp", "key", "chair", "boat", "kite", "drum", "coat"]
FRUITS = ["apple", "pear", "plum", "orange", "lemon", "peach", "cherry", "grape", "melon", "banana"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink", "gray", "purple"]
SIZES = ["big", "small", "tall", "short", "old", "young", "happy", "quiet", "fast", "slow"]
PLACES = ["the park", "the river", "the school", "the market", "the garden", "the hill", "the forest",
          "the house", "the beach", "the farm"]
VERBS = [("see", "sees", "saw"), ("like", "likes", "liked"), ("find", "finds", "found"),
         ("follow", "follows", "followed"), ("help", "helps", "helped"), ("watch", "watches", "watched")]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
          "october", "november", "december"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]


def _plural(noun: str, n: int) -> str:
    if n == 1:
        return noun
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun + "s"


def _noun_phrase(r: random.Random, nouns: list[str]) -> str:
    noun = r.choice(nouns)
    adj = r.choice(COLORS + SIZES)
    return f"the {adj} {noun}" if r.random() < 0.7 else f"the {noun}"


def _simple_sentence(r: random.Random) -> str:
    base, third, past = r.choice(VERBS)
    subj = _noun_phrase(r, ANIMALS) if r.random() < 0.8 else r.choice(NAMES)
    verb = third if r.random() < 0.6 else past
    tail = f" in {r.choice(PLACES)}" if r.random() < 0.4 else ""
    return f"{subj} {verb} {_noun_phrase(r, ANIMALS + THINGS)}{tail}."


def _arithmetic(r: random.Random) -> str:
    a, b = r.randint(0, 99), r.randint(0, 99)
    kind = r.randrange(4)
    if kind == 0:
        return f"{a}+{b}={a + b}."
    if kind == 1:
        return f"{a} plus {b} is {a + b}."
    if kind == 2:
        hi, lo = max(a, b), min(a, b)
        return f"{hi} minus {lo} is {hi - lo}."
    x, y = r.randint(0, 12), r.randint(0, 12)
    return f"{x} times {y} is {x * y}."


def _story(r: random.Random) -> str:
    name, fruit = r.choice(NAMES), r.choice(FRUITS)
    n, m = r.randint(1, 9), r.randint(1, 9)
    first = f"{name} has {n} {_plural(fruit, n)}."
    if r.random() < 0.5:
        return f"{first} {name} gets {m} more. now {name} has {n + m} {_plural(fruit, n + m)}."
    m = r.randint(1, n)
    return f"{first} {name} eats {m}. now {name} has {n - m} {_plural(fruit, n - m)}."


def _sequence(r: random.Random) -> str:
    kind = r.randrange(4)
    if kind == 0:
        i = r.randrange(len(DAYS))
        return f"after {DAYS[i]} comes {DAYS[(i + 1) % len(DAYS)]}."
    if kind == 1:
        i = r.randrange(len(MONTHS))
        return f"the month after {MONTHS[i]} is {MONTHS[(i + 1) % len(MONTHS)]}."
    if kind == 2:
        start = r.randint(0, 14)
        return "count: " + ", ".join(NUMBER_WORDS[start:start + r.randint(3, 6)]) + "."
    start = r.randint(1, 80)
    step = r.randint(1, 5)
    return "numbers: " + " ".join(str(start + k * step) for k in range(r.randint(4, 7))) + "."


def _list_sentence(r: random.Random) -> str:
    group, words = r.choice([("colors", COLORS), ("fruits", FRUITS), ("animals", ANIMALS), ("days", DAYS)])
    picked = r.sample(words, r.randint(2, 4))
    return f"{group}: {', '.join(picked)}."


def _describe(r: random.Random) -> str:
    name, animal = r.choice(NAMES), r.choice(ANIMALS)
    color, size = r.choice(COLORS), r.choice(SIZES)
    return f"{name} has a {size} {color} {animal}. the {animal} is {color}. the {animal} is {size}."


SENTENCES: list[tuple[Callable[[random.Random], str], float]] = [
    (_simple_sentence, 0.30), (_arithmetic, 0.25), (_story, 0.15), (_sequence, 0.12),
    (_list_sentence, 0.08), (_describe, 0.10)]


def _document(r: random.Random) -> str:
    makers, weights = zip(*SENTENCES)
    return " ".join(r.choices(makers, weights)[0](r) for _ in range(r.randint(3, 8)))


def generate_corpus(seed: int = 0, num_bytes: int = 1_000_000) -> str:
    """Documents (blank-line separated) until ``num_bytes`` is reached; ASCII, ends with a newline."""
    r = random.Random(seed)
    docs, size = [], 0
    while size < num_bytes:
        doc = _document(r)
        docs.append(doc)
        size += len(doc) + 2
    return "\n\n".join(docs) + "\n"


# ---- the verifiable task: two-digit addition ----------------------------------------------------------

def addition_pairs(seed: int = 0) -> list[tuple[int, int]]:
    """All 8100 pairs of two-digit numbers in a seeded order (eval takes the first ones)."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs


def addition_prompts(seed: int = 0, n: int = 1000, split: str = "train", n_eval: int = 200) -> list[dict]:
    """RL prompts {"prompt": "12+34=", "answer": "46"}; 'eval' and 'train' never share a pair."""
    pairs = addition_pairs(seed)
    chosen = pairs[:n_eval] if split == "eval" else pairs[n_eval:n_eval + n]
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in chosen[:n]]


def addition_sft(seed: int = 0, n: int = 2000, n_eval: int = 200) -> list[dict]:
    """SFT rows {"prompt": "12+34=", "response": "46"} from the non-eval pairs (warm-starts a policy)."""
    pairs = addition_pairs(seed)[n_eval:]
    r = random.Random(seed + 1)
    return [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a, b in r.sample(pairs, n)]


def _wrong_sum(r: random.Random, a: int, b: int) -> int:
    right = a + b
    while True:
        kind = r.randrange(3)
        if kind == 0:
            wrong = right + r.choice([-10, 10, -1, 1, -2, 2])  # an off-by-one digit slip
        elif kind == 1:
            wrong = int(str(right)[::-1])  # digits swapped
        else:
            wrong = r.randint(20, 198)
        if wrong != right and wrong >= 0:
            return wrong


def addition_preferences(seed: int = 0, n: int = 2000, n_eval: int = 200) -> list[dict]:
    """{"prompt", "chosen": correct sum, "rejected": a plausible wrong sum}: a learnable preference."""
    pairs = addition_pairs(seed)[n_eval:]
    r = random.Random(seed + 2)
    rows = []
    for a, b in r.sample(pairs, n):
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(_wrong_sum(r, a, b))})
    return rows


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)


SHIPPED_SEED = 0
SHIPPED: dict[str, Callable[[], str]] = {
    "tiny_corpus.txt": lambda: generate_corpus(SHIPPED_SEED, 1_000_000),
    "addition_prompts.jsonl": lambda: _jsonl(addition_prompts(SHIPPED_SEED, 1000, "train")),
    "addition_prompts_eval.jsonl": lambda: _jsonl(addition_prompts(SHIPPED_SEED, 200, "eval")),
    "addition_sft.jsonl": lambda: _jsonl(addition_sft(SHIPPED_SEED, 2000)),
    "addition_preferences.jsonl": lambda: _jsonl(addition_preferences(SHIPPED_SEED, 2000)),
}


def main(argv: list[str] | None = None) -> int:
    from anymoe.data.config import SHIPPED_DIR

    ap = argparse.ArgumentParser(prog="python -m anymoe.data.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="regenerate the shipped files")
    ap.add_argument("--check", action="store_true", help="exit 1 if a shipped file differs")
    ap.add_argument("--corpus", metavar="FILE", help="write a corpus of --bytes from --seed to FILE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bytes", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    if args.corpus:
        Path(args.corpus).write_text(generate_corpus(args.seed, args.bytes), encoding="utf-8")
    bad = 0
    for name, make in SHIPPED.items():
        path = SHIPPED_DIR / name
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(make(), encoding="utf-8")
            print(f"wrote {path} ({path.stat().st_size} bytes)")
        if args.check and (not path.is_file() or path.read_text(encoding="utf-8") != make()):
            print(f"{path} differs from its generator; run python -m anymoe.data.synthetic --write")
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
