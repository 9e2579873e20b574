"""`anymoe convert` and `anymoe generate` end to end on tiny checkpoints."""

import json

import torch

from anymoe.cli import main
from anymoe.models import MoETransformer, from_pretrained, preset, save_pretrained


def _saved(tmp_path):
    torch.manual_seed(0)
    model = MoETransformer(preset("tiny", vocab_size=260)).eval()
    save_pretrained(model, tmp_path / "ck")
    return model


def test_convert_anymoe_to_hf_and_back(tmp_path, capsys):
    model = _saved(tmp_path)
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mixtral"
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "anymoe"]) == 0
    assert (tmp_path / "back" / "tokenizer_config.json").is_file()
    ids = torch.randint(0, 260, (2, 6))
    with torch.no_grad():
        assert (from_pretrained(tmp_path / "back")(ids) - model(ids)).abs().max() <= 1e-6
    assert "wrote hf checkpoint" in capsys.readouterr().out


def test_convert_reports_bad_input(tmp_path, capsys):
    _saved(tmp_path)
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--to", "hf"]) == 2
    assert "does not exist" in capsys.readouterr().err
    rc = main(["convert", str(tmp_path / "ck"), str(tmp_path / "x"), "--to", "hf", "--arch", "qwen2_moe"])
    assert rc == 2 and "qwen2_moe" in capsys.readouterr().err


def test_generate_cli_greedy(tmp_path, capsys):
    model = _saved(tmp_path)
    rc = main(
        [
            "generate",
            str(tmp_path / "ck"),
            "--prompt",
            "hi",
            "--prompt",
            "hello",
            "--max-new-tokens",
            "5",
            "--json",
            "--no-cache",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["hi", "hello"]
    from anymoe.models.generate import generate

    want = generate(model, [list(b"hi")], 5, stop_tokens=[258], pad_id=256)
    assert rows[0]["tokens"] == want.tokens[0, : int(want.lengths[0])].tolist()


def test_from_pretrained_reads_a_trainer_checkpoint(tmp_path):
    import yaml

    torch.manual_seed(0)
    model = MoETransformer(preset("tiny", n_layers=1)).eval()
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": {"preset": "tiny", "n_layers": 1}, "train": {"steps": 10}})
    )
    torch.save(model.state_dict(), step / "model.pt")
    loaded = from_pretrained(step).eval()
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
