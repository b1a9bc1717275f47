import json

import pytest
import torch
from click.testing import CliRunner

import headsteer
from headsteer import HeadSet, HeadsteerError
from headsteer.cli import main
from headsteer.data import load_easy_vqa
from headsteer.edit import EditManifest, apply_edit, export, load_edited
from headsteer.edit.lora import train_head_lora


@pytest.fixture(scope="module")
def model_proc():
    return headsteer.load("default")


@pytest.fixture(scope="module")
def batch(model_proc):
    model, proc = model_proc
    ds = load_easy_vqa("test", limit=4)
    return headsteer.get_adapter(model, proc).encode(ds["image"], ds["question"])


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def make(kind, model, proc):
    ad = headsteer.get_adapter(model, proc)
    if kind == "scale":
        return EditManifest("scale", "L1H2,L3H0-1", {"factor": 2.5})
    if kind == "attn":
        return EditManifest("attn", "L2H*", {"alpha": 2.0})
    if kind == "steer":
        vec = torch.randn(ad.num_layers, ad.num_heads, ad.head_dim, generator=torch.Generator().manual_seed(0))
        return EditManifest("steer", "L2H1,L3H4", {"strength": 1.5}).with_tensors({"vectors": vec})
    ds = load_easy_vqa("train", limit=64)
    t, p = train_head_lora(model, proc, HeadSet.parse("L2H1,L3H0-1"), ds, steps=3, targets=("q", "v", "o"))
    return EditManifest("lora", "L2H1,L3H0-1", p).with_tensors(t)


@pytest.mark.parametrize("kind", ["scale", "attn", "steer", "lora"])
def test_export_round_trip(model_proc, batch, kind, tmp_path):
    model, proc = model_proc
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = make(kind, model, proc)
    ref = logits(model, batch)
    with apply_edit(model, m):
        edited = logits(model, batch)
    assert (edited - ref).abs().max() > 1e-4  # the edit does something
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # and is undone
    r = export(model, proc, m, tmp_path / "ck")
    assert r["baked"] == (kind != "attn")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if r["baked"]:
        from transformers import AutoModelForImageTextToText

        plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "ck").eval()
        torch.testing.assert_close(logits(plain, batch), edited, atol=1e-5, rtol=0)
    m2, _ = load_edited(tmp_path / "ck")
    torch.testing.assert_close(logits(m2, batch), edited, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "ck" / "headsteer_edit.json").read_text())["kind"] == kind


def test_manifest_round_trip_and_errors(model_proc, tmp_path):
    model, proc = model_proc
    m = make("steer", model, proc)
    m.save(tmp_path / "e.json")
    m2 = EditManifest.load(tmp_path / "e.json")
    assert (m2.kind, m2.heads, m2.params) == (m.kind, m.heads, m.params)
    assert torch.equal(m2.tensor_data["vectors"], m.tensor_data["vectors"])
    with pytest.raises(HeadsteerError, match="unknown edit kind"):
        EditManifest("shrink", "L0H0")
    bad = EditManifest("scale", "L9H0", {"factor": 0.0})
    with pytest.raises(HeadsteerError, match="out of range"):
        with apply_edit(model, bad):
            pass
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(HeadsteerError, match="not a valid edit manifest"):
        EditManifest.load(tmp_path / "x.json")


def test_export_refuses_to_overwrite(model_proc, tmp_path):
    model, proc = model_proc
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    m = EditManifest("scale", "L0H0", {"factor": 0.0})
    with pytest.raises(HeadsteerError, match="--force"):
        export(model, proc, m, out)
    assert (out / "keep.txt").exists()
    with pytest.raises(HeadsteerError, match="not a checkpoint exported by headsteer"):
        export(model, proc, m, out, force=True)  # --force replaces only a checkpoint headsteer wrote
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    export(model, proc, m, out)
    export(model, proc, m, out, force=True)
    assert (out / "model.safetensors").exists() and (out / "headsteer_edit.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ck.")]


def test_lora_touches_only_the_selected_heads(model_proc):
    model, proc = model_proc
    ad = headsteer.get_adapter(model, proc)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heads = HeadSet.parse("L1H3,L3H6")
    t, p = train_head_lora(model, proc, heads, load_easy_vqa("train", limit=64), steps=4, targets=("q", "o"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    m = EditManifest("lora", str(heads), p).with_tensors(t)
    d = ad.head_dim
    with apply_edit(model, m):
        for l in range(ad.num_layers):
            q, o = ad.attention[l].q_proj.weight, ad.out_proj(l).weight
            q0 = before[[k for k in before if k.endswith(f"language_model.layers.{l}.self_attn.q_proj.weight")][0]]
            o0 = before[[k for k in before if k.endswith(f"language_model.layers.{l}.self_attn.o_proj.weight")][0]]
            for h in range(ad.num_heads):
                rows, cols = q[h * d : (h + 1) * d], o[:, h * d : (h + 1) * d]
                same = torch.equal(rows, q0[h * d : (h + 1) * d]) and torch.equal(cols, o0[:, h * d : (h + 1) * d])
                assert same == ((l, h) not in heads), (l, h)


def test_cli_edit_ask_export(tmp_path):
    r = CliRunner().invoke(main, ["edit", "scale", "--heads", "L2H0-3", "--factor", "0", "--out", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["ask", "--edit", str(tmp_path / "s.json")])
    assert r.exit_code == 0 and "edited" in r.output, r.output
    r = CliRunner().invoke(main, ["export", "--edit", str(tmp_path / "s.json"), "--out", str(tmp_path / "ck")])
    assert r.exit_code == 0 and "plain transformers" in r.output, r.output
    r = CliRunner().invoke(main, ["edit", "attn", "--heads", "L7H0", "--alpha", "1", "--out", str(tmp_path / "a.json")])
    assert r.exit_code != 0 and "out of range" in r.output


def test_lora_peft_adapter_directory_reproduces_the_edit(model_proc, batch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model, proc = model_proc
    heads = HeadSet.parse("L2H1,L3H0-1")
    t, p = train_head_lora(model, proc, heads, load_easy_vqa("train", limit=64), steps=3, targets=("q", "o"),
                           adapter_dir=tmp_path / "adapter")
    m = EditManifest("lora", str(heads), p).with_tensors(t)
    with apply_edit(model, m):
        edited = logits(model, batch)
    base = AutoModelForImageTextToText.from_pretrained(headsteer.default_model_path()).eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, batch), edited, atol=1e-5, rtol=0)
    export(model, proc, m, tmp_path / "ck")
    assert (tmp_path / "ck" / "lora_adapter" / "adapter_config.json").exists()


def test_class_sets_pick_rows_by_answer():
    import datasets

    from headsteer.edit.steer import class_sets

    ds = datasets.Dataset.from_dict({"image": [f"im{i}" for i in range(6)], "question": [f"q{i}" for i in range(6)],
                                     "answer": ["circle", "red", "rectangle", "circle", "circle", "rectangle"]})
    a, b = class_sets(ds, "circle", "rectangle", n=2)
    assert a == [("im0", "q0"), ("im3", "q3")] and b == [("im2", "q2"), ("im5", "q5")]
