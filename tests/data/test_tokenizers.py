"""Byte tokenizer round trip; a Hugging Face tokenizer BUILT here (tiny BPE) loaded from a local dir."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anymoe.core.config import ConfigError, load_config
from anymoe.data import DataConfig, build_data
from anymoe.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer, check_vocab


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert ids == list(text.encode("utf-8"))  # the plain reference: ids are the UTF-8 bytes
    assert tok.encode_batch([text, text[::-1]]) == [ids, tok.encode(text[::-1])]


def test_byte_specials():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
    ids = [tok.bos_id, *tok.encode("hé"), tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "hé"
    assert tok.decode(ids, skip_special=False) == "<bos>hé<eos><pad>"


def test_check_vocab_names_the_model_field():
    with pytest.raises(ConfigError, match="at least 259") as info:
        check_vocab(ByteTokenizer(), 256)
    assert info.value.field == "model.vocab_size"
    check_vocab(ByteTokenizer(), 259)


SENTENCES = ["the red cat sees the dog.", "12+34=46.", "anna has 3 apples. now anna has 5 apples.",
             "after monday comes tuesday.", "the small bird likes the big bird."] * 4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """Train a tiny BPE with the `tokenizers` library and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(str(d))
    return d


def test_hf_tokenizer_from_a_locally_built_dir(hf_dir):
    tok = build_tokenizer(str(hf_dir))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    text = "the red cat sees 12+34=46."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eos_id not in ids and tok.bos_id not in ids  # encode adds no specials
    assert len(ids) < len(text.encode())  # merges were learned
    assert tok.vocab_size >= max(ids) + 1 and tok.vocab_size == len(tok._tok)
    assert tok.decode([*ids, tok.eos_id], skip_special=True) == text
    assert tok.encode_batch([text, "12+34=46.", ""]) == [ids, tok.encode("12+34=46."), []]


def test_hf_tokenizer_drives_a_dataset(hf_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(SENTENCES))
    cfg = load_config(DataConfig, {"path": str(corpus), "tokenizer": str(hf_dir), "seq_len": 8}, "data")
    data = build_data(cfg)
    batch = data.train_stream(2).next_batch()
    assert batch["input_ids"].shape == (2, 8)
    assert int(batch["input_ids"].max()) < data.tokenizer.vocab_size


def test_hf_tokenizer_bad_dirs(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as info:
        HFTokenizer(tmp_path / "missing")
    assert info.value.field == "data.tokenizer"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    with pytest.raises(ConfigError, match="cannot read a tokenizer") as info:
        HFTokenizer(broken)
    assert info.value.field == "data.tokenizer"
