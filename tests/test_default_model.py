"""The embedded default checkpoint: plain transformers loading, adapter facts, CLI."""
import json
from pathlib import Path

import torch
from click.testing import CliRunner

import headsteer
from headsteer.cli import main


def test_loads_in_plain_transformers():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = headsteer.default_model_path()
    model = AutoModelForImageTextToText.from_pretrained(path)
    proc = AutoProcessor.from_pretrained(path)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(proc).__name__ == "LlavaProcessor"
    size = sum(f.stat().st_size for f in Path(path).iterdir())
    assert size < 20e6


def test_architecture_has_gqa_heads(default_model):
    model, proc = default_model
    ad = headsteer.get_adapter(model, proc)
    assert ad.num_layers >= 4 and ad.num_heads == 8 and ad.num_kv_heads == 4
    ids = ad.encode([headsteer.ask.default_image()], ["what color is the shape?"])["input_ids"]
    groups = ad.token_groups(ids)
    assert int(groups["image"].sum()) == 64
    toks = proc.tokenizer.convert_ids_to_tokens(ids[0][groups["role"][0] | groups["last"][0]])
    assert toks == ["assistant", ":"]


def test_answers_easy_vqa_shape_and_colour(default_model):
    """A regression guard on the shipped checkpoint: it must read the image."""
    from headsteer.data import load_easy_vqa

    model, proc = default_model
    ad = headsteer.get_adapter(model, proc)
    ds = load_easy_vqa("test", limit=64, qtypes=("shape", "color"))
    with torch.no_grad():
        logits = model(**ad.encode(ds["image"], ds["question"])).logits[:, -1]
    pred = proc.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    acc = sum(p == a for p, a in zip(pred, ds["answer"])) / len(ds)
    assert acc >= 0.8


def test_cli_info_and_ask():
    r = CliRunner().invoke(main, ["info"])
    assert r.exit_code == 0, r.output
    assert "8 query / 4 KV" in r.output
    r = CliRunner().invoke(main, ["ask", "--question", "what color is the shape?"])
    assert r.exit_code == 0, r.output
    assert "answer" in r.output


def test_cli_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(main, ["ask", "--image", str(tmp_path / "missing.png")])
    assert r.exit_code != 0 and "image not found" in r.output and "Traceback" not in r.output
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    r = CliRunner().invoke(main, ["info", "--model", str(tmp_path)])
    assert r.exit_code != 0 and "unsupported architecture" in r.output and "llava" in r.output
    bad = tmp_path / "ck"
    bad.mkdir()
    (bad / "config.json").write_text(Path(headsteer.default_model_path(), "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"garbage")
    r = CliRunner().invoke(main, ["info", "--model", str(bad)])
    assert r.exit_code != 0 and "corrupt checkpoint" in r.output


def _open_rows(model, proc, ds, max_new_tokens):
    from headsteer.eval import evaluate

    gc = model.generation_config
    old = gc.max_new_tokens
    gc.max_new_tokens = max_new_tokens  # what a harness passes; open mode takes the model's generation config
    try:
        return evaluate(model, proc, ds, ("accuracy",), mode="open", batch_size=30, check=False)
    finally:
        gc.max_new_tokens = old


def test_open_answers_end_with_eos(default_model):
    """The model ends its one-word answer with </s>: a harness's max_new_tokens changes nothing."""
    from headsteer.data import load_easy_vqa
    from headsteer.eval import summary

    model, proc = default_model
    ds = load_easy_vqa("test", limit=60)
    short, long = _open_rows(model, proc, ds, 1), _open_rows(model, proc, ds, 16)
    assert [r["prediction"] for r in long] == [r["prediction"] for r in short]
    assert all(len(r["prediction"].split()) == 1 for r in long)
    assert summary(long)["accuracy"] == summary(short)["accuracy"]
    tok, gc = proc.tokenizer, model.generation_config
    assert gc.eos_token_id == tok.eos_token_id and gc.pad_token_id == tok.pad_token_id
    ad = headsteer.get_adapter(model, proc)
    inputs = ad.encode(ds["image"], ds["question"])
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False)  # the length the model's own generation config gives
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    assert len(new[0]) < (gc.max_new_tokens or 20)  # stopped by </s>, not by the length limit
    for row in new:
        assert row[0] not in tok.all_special_ids and row[1] == tok.eos_token_id, tok.convert_ids_to_tokens(row)
