"""A corpus of malformed run configs: each is rejected before any work with one message that
names the field and says how to fix it (issue 10; issue 6 asks for >= 20).

Every case goes through the real command line (`anymoe train CONFIG --out RUN_DIR`): exit
code 2, one ``anymoe train: ...`` line naming the field, and nothing written to RUN_DIR.
"""

import copy
import os

import pytest
import yaml

from anymoe.cli import main

BASE = {
    "name": "t",
    "model": {"preset": "tiny", "vocab_size": 259, "d_model": 32, "max_seq_len": 64},
    "data": {"format": "text", "path": "shipped:tiny_corpus.txt", "seq_len": 32},
    "optim": {"lr": 1e-3, "min_lr": 1e-4},
    "train": {"steps": 2, "micro_batch": 2, "global_batch": 4},
    "logging": {"progress": False, "tensorboard": False, "plots": False},
}


def with_(path, value):
    """BASE with ``path`` (dotted) set to ``value``; value DELETE removes the key."""
    data = copy.deepcopy(BASE)
    node = data
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    if value is DELETE:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value
    return yaml.safe_dump(data)


DELETE = object()
NO_TOKENIZER_DIR = "/tmp/anymoe-test-empty-tokenizer-dir"

# (id, YAML text or (path, value), extra CLI args, field named in the message, fix words in it)
CASES = [
    ("unknown-top-key", with_("trian", {"steps": 3}), [], "trian", "did you mean 'train'"),
    ("unknown-optim-key", with_("optim.learning_rate", 1e-3), [], "optim.learning_rate", "valid keys"),
    ("typo-train-steps", with_("train.stpes", 5), [], "train.stpes", "did you mean 'steps'"),
    ("typo-model-key", with_("model.d_modle", 64), [], "model.d_modle", "did you mean 'd_model'"),
    ("steps-not-int", with_("train.steps", "many"), [], "train.steps", "expected an integer"),
    ("lr-not-number", with_("optim.lr", "fast"), [], "optim.lr", "expected a number"),
    ("steps-zero", with_("train.steps", 0), [], "train.steps", ">= 1"),
    ("lr-negative", with_("optim.lr", -1.0), [], "optim.lr", "> 0"),
    ("beta2-too-big", with_("optim.beta2", 1.5), [], "optim.beta2", "< 1.0"),
    ("schedule-unknown", with_("optim.schedule", "linear"), [], "optim.schedule", "must be one of"),
    ("precision-unknown", with_("train.precision", "fp8"), [], "train.precision", "'fp32'"),
    ("min-lr-above-lr", with_("optim.min_lr", 1.0), [], "optim.min_lr", "lower min_lr"),
    ("ep-not-dividing-experts", with_("parallel.ep", 3), [], "parallel.ep", "not divisible"),
    ("ep-zero", with_("parallel.ep", 0), [], "parallel.ep", ">= 1"),
    ("ep-larger-than-world", with_("parallel.ep", 2), [], "parallel.ep", "start more processes"),
    ("dp-times-ep-not-world", with_("parallel.dp", 2), [], "parallel.dp", "dp: auto"),
    ("backend-unknown", with_("backend", "tpu"), [], "backend", "choose one of"),
    ("data-file-missing", with_("data.path", "/nonexistent/corpus.txt"), [], "data.path", "does not exist"),
    ("data-path-is-dir", with_("data.path", "/tmp"), [], "data.path", "is a directory"),
    ("tokenizer-dir-missing", with_("data.tokenizer", "/nonexistent/tok"), [], "data.tokenizer",
     "anymoe never downloads"),
    ("tokenizer-dir-empty", with_("data.tokenizer", NO_TOKENIZER_DIR), [], "data.tokenizer",
     "holds no tokenizer files"),
    ("invalid-yaml", "model: {preset: tiny\ntrain: [1, 2\n", [], "", "not valid YAML"),
    ("yaml-tabs", "model:\n\tpreset: tiny\n", [], "", "not valid YAML"),
    ("top-level-list", "- model\n- data\n", [], "", "mapping of settings"),
    ("model-missing", with_("model", DELETE), [], "model", "is required"),
    ("preset-unknown", with_("model.preset", "giant"), [], "model.preset", "choose from"),
    ("topk-above-experts", with_("model.moe", {"num_experts": 4, "top_k": 6, "expert_hidden": 32}), [],
     "model.moe.top_k", "num_experts"),
    ("heads-not-multiple-of-kv", with_("model.n_heads", 3), [], "model.n_kv_heads", "divisor of n_heads"),
    ("global-batch-not-multiple", with_("train.global_batch", 5), [], "train.global_batch",
     "multiple of micro_batch"),
    ("grad-accum-conflict", with_("train.grad_accum", 3), [], "train.grad_accum",
     "only one of grad_accum and global_batch"),
    ("seq-len-over-max", with_("data.seq_len", 4096), [], "data.seq_len", "max_seq_len"),
    ("eval-split-out-of-range", with_("data.eval_split", 1.5), [], "data.eval_split", "[0, 1)"),
    ("spike-factor-below-one", with_("train.spike_factor", 0.5), [], "train.spike_factor", "> 1"),
    ("keep-last-zero", with_("checkpoint.keep_last", 0), [], "checkpoint.keep_last", ">= 1"),
    ("bool-for-int", with_("logging.every", True), [], "logging.every", "expected an integer"),
    ("format-unknown", with_("data.format", "csv"), [], "data.format", "must be one of"),
    ("moe-not-mapping", with_("model.moe", 5), [], "model.moe", "expected a mapping"),
    ("vocab-below-tokenizer", with_("model.vocab_size", 100), [], "model.vocab_size", "at least 259"),
    ("prompt-split-on-text", with_("data.prompt_split", "###"), [], "data.prompt_split", "format: sft"),
    ("override-without-equals", yaml.safe_dump(BASE), ["--set", "optim.lr"], "optim.lr", "key.path=value"),
    ("override-wrong-type", yaml.safe_dump(BASE), ["--set", "train.micro_batch=abc"], "train.micro_batch",
     "expected an integer"),
    ("override-unknown-key", yaml.safe_dump(BASE), ["--set", "optim.lrr=1"], "optim.lrr",
     "did you mean 'lr'"),
    ("cli-steps-zero", yaml.safe_dump(BASE), ["--steps", "0"], "train.steps", ">= 1"),
    ("config-file-missing", None, [], "", "does not exist"),
    ("backend-not-here", yaml.safe_dump(BASE), ["--backend", "npu"],
     "backend", "is not usable here"),
    ("sizing-unknown", yaml.safe_dump(BASE), ["--sizing", "pow3"], "--sizing",
     "identity, pow2, multiple_of:N"),
    ("nproc-zero", yaml.safe_dump(BASE), ["--nproc", "0"], "--nproc", ">= 1"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_config_rejected_before_work(case, tmp_path, capsys):
    name, text, extra, field, fix = case
    os.makedirs(NO_TOKENIZER_DIR, exist_ok=True)
    cfg = tmp_path / "bad.yaml"
    if text is not None:
        cfg.write_text(text)
    run_dir = tmp_path / "run"
    rc = main(["train", str(cfg), "--out", str(run_dir), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("anymoe train:")]
    assert len(lines) == 1, err
    assert field in lines[0], lines[0]
    assert fix in lines[0], lines[0]
    assert not run_dir.exists(), "a rejected config must not create the run directory"


def test_corpus_size():
    assert len(CASES) >= 30
