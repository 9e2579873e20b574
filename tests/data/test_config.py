"""DataConfig: good configs load; every bad one is a ConfigError naming its field, before training."""

import json
import os

import pytest

from anymoe.core.config import ConfigError, load_config, to_dict
from anymoe.data.config import SHIPPED_DIR, DataConfig, resolve_path


def _load(data):
    return load_config(DataConfig, data, "data")


@pytest.fixture
def files(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("hello world\n\nsecond doc\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
    tokdir = tmp_path / "emptytok"
    tokdir.mkdir()
    return {"text": str(text), "sft": str(sft), "dir": str(tmp_path), "emptytok": str(tokdir)}


def test_defaults_use_the_shipped_corpus_and_round_trip():
    cfg = _load({})
    assert cfg.format == "text" and cfg.paths == ["shipped:tiny_corpus.txt"] and cfg.tokenizer == "bytes"
    assert resolve_path(cfg.path) == SHIPPED_DIR / "tiny_corpus.txt"
    assert _load(to_dict(cfg)) == cfg


def test_eval_split_is_a_fraction_or_a_file(files):
    assert _load({"eval_split": 0.1}).eval_fraction == 0.1
    cfg = _load({"path": files["text"], "eval_split": files["text"]})
    assert cfg.eval_file == files["text"] and cfg.eval_fraction == 0.0
    assert _load({"path": [files["text"], files["text"]]}).paths == [files["text"]] * 2


def test_synthetic_needs_no_file():
    assert _load({"format": "synthetic", "path": ""}).format == "synthetic"


@pytest.mark.parametrize("data, field, words", [
    ({"path": "/nonexistent/corpus.txt"}, "data.path", "does not exist"),
    ({"path": ["{text}", "/nonexistent/b.txt"]}, "data.path[1]", "does not exist"),
    ({"path": "{dir}"}, "data.path", "is a directory"),
    ({"path": ""}, "data.path", "give a path"),
    ({"format": "csv"}, "data.format", "must be one of"),
    ({"seq_len": 1}, "data.seq_len", ">= 2"),
    ({"seq_len": "long"}, "data.seq_len", "expected an integer"),
    ({"packing": "yes"}, "data.packing", "true or false"),
    ({"eval_split": 1.5}, "data.eval_split", "[0, 1)"),
    ({"eval_split": -0.1}, "data.eval_split", "[0, 1)"),
    ({"eval_split": "/nonexistent/eval.jsonl"}, "data.eval_split", "does not exist"),
    ({"tokenizer": "/nonexistent/tokdir"}, "data.tokenizer", "never downloads"),
    ({"tokenizer": "{text}"}, "data.tokenizer", "is a file"),
    ({"tokenizer": "{emptytok}"}, "data.tokenizer", "holds no tokenizer files"),
    ({"prompt_split": ""}, "data.prompt_split", "separator"),
    ({"prompt_split": "\nA:"}, "data.prompt_split", "has no prompts"),
    ({"format": "preference", "path": "{sft}", "prompt_split": "="}, "data.prompt_split", "keys"),
    ({"format": "sft", "path": "{sft}", "output_key": "prompt"}, "data.output_key", "different fields"),
    ({"format": "sft", "path": "{sft}", "input_key": ""}, "data.input_key", "cannot be empty"),
    ({"seed": -1}, "data.seed", ">= 0"),
    ({"seqlen": 64}, "data.seqlen", "did you mean 'seq_len'"),
    ({"synthetic_bytes": 10}, "data.synthetic_bytes", ">= 1000"),
])
def test_bad_config_names_its_field(files, data, field, words):
    def fill(v):
        if isinstance(v, str):
            return v.format(**files)
        if isinstance(v, list):
            return [fill(x) for x in v]
        return v
    with pytest.raises(ConfigError) as info:
        _load({k: fill(v) for k, v in data.items()})
    assert info.value.field == field, str(info.value)
    assert words in str(info.value)
    assert str(info.value).startswith(field)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_tokenizer_dir(files, tmp_path):
    d = tmp_path / "locked"
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    d.chmod(0)
    try:
        with pytest.raises(ConfigError, match="not readable") as info:
            _load({"tokenizer": str(d)})
        assert info.value.field == "data.tokenizer"
    finally:
        d.chmod(0o755)
