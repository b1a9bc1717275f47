"""The second hardening sweep, inputs: no silently wrong result and no Python exception's text for
bad input. Strict loading, images of every PIL mode, prompts past the context, data rows checked one
by one (encodings, bytes images, types, --qtype for every source), VQA accuracy for any number of
references, edits and attribution runs that carry their model's identity, and the library's entry
points checking shapes against the batch. One default model is shared."""
from __future__ import annotations

import base64
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

import headsteer
from headsteer import HeadSet, HeadsteerError, intervene
from headsteer.cli import main
from headsteer.edit import EditManifest, apply_edit, export, load_edited
from headsteer.edit.manifest import provenance


def cli(args, cwd=None, monkeypatch=None):
    if cwd is not None:
        monkeypatch.chdir(cwd)
    r = CliRunner().invoke(main, args)
    return r.exit_code, r.output.strip()


def one_line(code, out, needle, exit_code=1):
    assert code == exit_code and len(out.splitlines()) == 1 and needle in out and "unexpected" not in out, out


def ckpt_copy(tmp_path, name, config=None, weights=None) -> Path:
    """The default checkpoint under ``name`` (files linked), with a changed config and/or weights."""
    src = Path(headsteer.default_model_path())
    d = tmp_path / name
    d.mkdir()
    for p in src.iterdir():
        (d / p.name).symlink_to(p)
    if config is not None:
        cfg = json.loads((src / "config.json").read_text())
        config(cfg)
        (d / "config.json").unlink()
        (d / "config.json").write_text(json.dumps(cfg))
    if weights is not None:
        sd = weights(load_file(str(src / "model.safetensors")))
        (d / "model.safetensors").unlink()
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


# -- 2. strict loading --------------------------------------------------------------------------------

def test_weights_that_do_not_match_the_config_are_refused_naming_them(tmp_path, monkeypatch):
    def six_layers(c):
        c["text_config"]["num_hidden_layers"] = 6

    def wider_mlp(c):
        c["text_config"]["intermediate_size"] = 200

    def no_lm_head(sd):
        sd.pop("language_model.lm_head.weight")
        return sd

    def extra(sd):
        return {**sd, "language_model.model.extra.weight": torch.zeros(3)}

    for name, kw, needle in (("six", {"config": six_layers}, "layers.4"), ("nolm", {"weights": no_lm_head}, "lm_head.weight"),
                             ("extra", {"weights": extra}, "extra.weight"), ("wide", {"config": wider_mlp}, "mlp.down_proj")):
        d = ckpt_copy(tmp_path, name, **kw)
        with pytest.raises(HeadsteerError, match=needle):
            headsteer.load(d)
    code, out = cli(["info", "--model", str(tmp_path / "wide")])
    one_line(code, out, "of another shape")
    assert "ignore_mismatched_sizes" not in out

    def tied(c):
        c["tie_word_embeddings"] = c["text_config"]["tie_word_embeddings"] = True

    m, _ = headsteer.load(ckpt_copy(tmp_path, "tied", config=tied, weights=no_lm_head))  # tied: no lm_head tensor needed
    assert m.lm_head.weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()


# -- 2. images of every mode --------------------------------------------------------------------------

def test_images_of_every_pil_mode_convert_faithfully():
    from headsteer.images import to_rgb

    def px(im):
        return to_rgb(im).getpixel((0, 0))

    grey = np.array([[0, 100], [200, 255]], np.uint8)
    want = to_rgb(Image.fromarray(grey, "L"))
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I;16") and np.array_equal(np.asarray(to_rgb(sixteen)), np.asarray(want))
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(grey.astype(np.int32) * 257))), np.asarray(want))  # mode I
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(grey.astype(np.float32) / 255))), np.asarray(want))  # F in [0, 1]
    assert px(Image.new("RGBA", (2, 2), (0, 0, 0, 0))) == (255, 255, 255)  # transparent on white
    assert px(Image.new("RGBA", (2, 2), (0, 0, 0, 128))) == (127, 127, 127)
    assert px(Image.new("LA", (2, 2), (0, 0))) == (255, 255, 255)
    assert px(Image.new("La", (2, 2), (100, 128))) == (227, 227, 227)  # premultiplied
    assert px(Image.new("CMYK", (2, 2), (0, 255, 255, 0))) == (255, 0, 0)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0
    assert px(pal) == (255, 255, 255)
    for bad in (Image.fromarray(np.full((2, 2), 70000, np.int32)), Image.fromarray(np.full((2, 2), 300.0, np.float32)),
                Image.fromarray(np.full((2, 2), np.nan, np.float32))):
        with pytest.raises(HeadsteerError):
            to_rgb(bad)


def test_a_16_bit_image_is_answered_as_its_8_bit_twin(default_model, tmp_path):
    from headsteer.ask import top_answers
    from headsteer.data import load_easy_vqa

    model, proc = default_model
    row = next(r for r in load_easy_vqa("test", limit=40, qtypes=("shape",)) if r["answer"] == "circle")
    grey = np.asarray(row["image"].convert("L"))
    Image.fromarray(grey).save(tmp_path / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    a8 = top_answers(model, proc, str(tmp_path / "g8.png"), row["question"], 1)
    a16 = top_answers(model, proc, str(tmp_path / "g16.png"), row["question"], 1)
    assert a8 == a16


# -- 2/5. prompts past the context; a template escaping its sandbox -----------------------------------

def test_a_question_past_the_context_is_refused_before_any_forward(default_model, monkeypatch, tmp_path):
    from headsteer.baseline import make_baseline
    from headsteer.eval.transfer import transfer_batch

    model, proc = default_model
    ad = headsteer.get_adapter(model, proc)
    long = "what " * 20000
    with pytest.raises(HeadsteerError, match="longer than this model's context of 256"):
        ad.encode([headsteer.ask.default_image()], [long])
    with pytest.raises(HeadsteerError, match="context"):  # the transfer metrics would ask for ~128 GB
        transfer_batch(model, proc, [headsteer.ask.default_image()], [long], ["circle"], make_baseline(model, proc, "zero"))
    code, out = cli(["ask", "--question", long], tmp_path, monkeypatch)
    one_line(code, out, "context")


def test_a_chat_template_escaping_the_sandbox_is_one_line(tmp_path, monkeypatch):
    d = ckpt_copy(tmp_path, "evil")
    (d / "chat_template.jinja").unlink()
    (d / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    code, out = cli(["ask", "--model", str(d)], tmp_path, monkeypatch)
    one_line(code, out, "chat template")
    assert "SecurityError" in out


# -- 3. data loaders validate every row ---------------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    return tmp_path


def _png_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(buf, "PNG")
    return buf.getvalue()


def test_local_files_encodings_and_bytes_images(folder):
    from headsteer.data import load_local_vqa

    (folder / "bom.csv").write_bytes("image,question,answer\nred.png,what color?,red\n".encode("utf-8-sig"))
    assert load_local_vqa(folder / "bom.csv")[0]["answer"] == "red"  # Excel's byte-order mark
    (folder / "latin.jsonl").write_bytes(b'{"image": "red.png", "question": "what color?", "answer": "red"}\n'
                                         b'{"image": "red.png", "question": "caf\xe9?", "answer": "red"}\n')
    with pytest.raises(HeadsteerError, match="not UTF-8 text .*line 2"):
        load_local_vqa(folder / "latin.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [_png_bytes()], "question": ["what color?"], "answer": ["blue"]}), folder / "raw.parquet")
    assert load_local_vqa(folder / "raw.parquet")[0]["image"].size == (32, 32)  # bytes are an image, not a path
    b64 = {"bytes": base64.b64encode(_png_bytes()).decode()}
    (folder / "b64.json").write_text(json.dumps([{"image": b64, "question": "what color?", "answer": "blue"}]))
    assert load_local_vqa(folder / "b64.json")[0]["image"].size == (32, 32)


@pytest.mark.parametrize("rows,needle", [
    (['{"image": "red.png", "question": "q?", "answer": "red"}', '{broken'], ".jsonl:2"),
    (['{"image": "red.png", "question": "q?", "answer": "red"}', '[1, 2]'], "example 2"),
    (['{"image": "red.png", "question": "q?", "answers": [["red"]]}'], "answers must be text"),
    (['{"image": "red.png", "question": "q?", "answer": NaN}'], "not an answer"),
    (['{"image": "red.png", "question": "q?", "answer": true}'], "answer must be text"),
    (['{"image": "red.png", "question": "q?", "answer": "red", "qtype": ["a"]}'], "qtype must be text"),
    (['{"image": 5, "question": "q?", "answer": "red"}'], "file path or image bytes"),
    (['{"image": "red.png", "question": 7, "answer": "red"}'], "question must be non-empty text"),
])
def test_every_row_is_checked_against_the_format(folder, rows, needle):
    from headsteer.data import load_local_vqa

    (folder / "d.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(HeadsteerError, match=needle):
        load_local_vqa(folder / "d.jsonl")


def test_vqa2_answer_records_are_read(folder):
    from headsteer.data import load_local_vqa

    row = {"image": "red.png", "question": "q?", "answers": [{"answer": "red", "answer_confidence": "yes"}, "red", 2]}
    (folder / "v.json").write_text(json.dumps([row]))
    assert load_local_vqa(folder / "v.json")[0]["answers"] == ["red", "red", "2"]


@pytest.mark.parametrize("lines,needle", [
    (['{"image": "red.png", "text": "is it red?", "label": "yes"}', '{oops'], ":2"),
    (['["red.png", "is it red?", "yes"]'], "row 1"),
    (['{"image": "red.png", "text": "<image> is it red?", "label": "yes"}'], "image placeholder"),
    (['{"image": "red.png", "text": "is it red?", "label": 1}'], "yes/no"),
])
def test_pope_rows_are_checked(folder, lines, needle, monkeypatch):
    from headsteer.eval import load_pope

    (folder / "pope.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(HeadsteerError, match=needle):
        load_pope(folder / "pope.jsonl")
    code, out = cli(["eval", "--data", "pope:pope.jsonl", "--metrics", "accuracy", "--limit", "2", "--out", "r"], folder,
                    monkeypatch)
    one_line(code, out, needle.strip("\\"))


def test_pope_not_in_utf8_is_one_line(folder, monkeypatch):
    (folder / "pope.jsonl").write_bytes(b'{"image": "red.png", "text": "caf\xe9?", "label": "yes"}\n')
    code, out = cli(["eval", "--data", "pope:pope.jsonl", "--metrics", "accuracy", "--limit", "2", "--out", "r"], folder,
                    monkeypatch)
    one_line(code, out, "not UTF-8")


def test_the_qtype_filter_applies_to_every_source_before_the_limit(folder):
    from headsteer.eval.benchmarks import load_benchmark

    rows = [{"image": "red.png", "question": "what shape?", "answer": "circle", "qtype": "shape"},
            {"image": "red.png", "question": "what color?", "answer": "red", "qtype": "color"}]
    (folder / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for spec in (f"vqa:{folder / 'v.jsonl'}", str(folder / "v.jsonl")):
        assert load_benchmark(spec, limit=1, qtypes=("color",))["qtype"] == ["color"]
    pope = [{"image": "red.png", "text": f"is there a {w}?", "label": "no", "category": c}
            for w, c in (("dog", "random"), ("cat", "adversarial"), ("cow", "popular"))]
    (folder / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pope))
    assert load_benchmark(f"pope:{folder / 'p.jsonl'}", qtypes=("adversarial",))["qtype"] == ["adversarial"]
    assert load_benchmark(f"pope:{folder / 'p.jsonl'}::popular", limit=1)["qtype"] == ["popular"]


def test_a_question_holding_the_processors_image_token_is_refused(default_model, monkeypatch):
    model, proc = default_model
    ad = headsteer.get_adapter(model, proc)
    monkeypatch.setattr(proc, "image_token", "<pic>", raising=False)
    with pytest.raises(HeadsteerError, match="<pic>"):
        ad.check_question("what is in <pic>?")


def test_vqa_accuracy_for_any_number_of_references():
    from headsteer.eval import soft_accuracy

    assert soft_accuracy("dog", ["dog", "dog"]) == 1.0  # was 0.333
    assert soft_accuracy("dog", ["dog", "cat"]) == pytest.approx(0.5)
    assert soft_accuracy("dog", ["dog", "dog", "cat"]) == pytest.approx(2 / 3)
    assert soft_accuracy("dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)  # the official VQAv2 figures
    assert soft_accuracy("dog", ["dog"] + ["cat"] * 9) == pytest.approx(0.3)
    assert soft_accuracy("dog", ["dog"] * 4 + ["cat"] * 6) == 1.0
    assert soft_accuracy("dog", ["dog"]) == 1.0 and soft_accuracy("cat", ["dog"]) == 0.0


@pytest.mark.parametrize("task", ["noise:nan", "noise:inf", "noise:-0.1", "contrast:nan", "contrast:-1", "contrast:2",
                                  "rename:", "rename:=x", "blur:1"])
def test_non_finite_or_out_of_range_tasks_are_refused(task, tmp_path, monkeypatch):
    from headsteer.edit.tasks import check_task

    with pytest.raises(HeadsteerError):
        check_task(task)
    code, out = cli(["eval", "--task", task, "--limit", "2", "--metrics", "accuracy", "--out", "r"], tmp_path, monkeypatch)
    one_line(code, out, "")
    assert not (tmp_path / "r").exists()


# -- 4. edits and runs carry their identity -----------------------------------------------------------

def _run(tmp_path, name, L, H, model_block=None):
    d = tmp_path / name
    d.mkdir()
    heads = [{"head": f"L{l}H{h}", "score": float(l * H + h)} for l in range(L) for h in range(H)][::-1]
    (d / "heads.json").write_text(json.dumps({"heads": heads, **({"model": model_block} if model_block else {})}))
    return d


def test_an_attribution_run_of_another_model_is_refused(default_model, tmp_path, monkeypatch):
    from headsteer.heads import select_heads, weights_by_dtype

    model, _ = default_model
    six = _run(tmp_path, "six", 6, 8)
    with pytest.raises(HeadsteerError, match="6 layers x 8 heads"):
        select_heads(None, six, 4, num_layers=4, num_heads=8, model=model)
    other = _run(tmp_path, "other", 4, 8, {"num_layers": 4, "num_heads": 8, "weights_by_dtype": {"float32": "0" * 64}})
    with pytest.raises(HeadsteerError, match="other weights"):
        select_heads(None, other, 4, num_layers=4, num_heads=8, model=model)
    same = _run(tmp_path, "same", 4, 8, {"num_layers": 4, "num_heads": 8, "weights_by_dtype": weights_by_dtype(model)})
    assert len(select_heads(None, same, 4, num_layers=4, num_heads=8, model=model)[0]) == 4
    code, out = cli(["edit", "scale", "--from-attribution", "six", "--factor", "0", "--out", "e.json"], tmp_path, monkeypatch)
    one_line(code, out, "6 layers")
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("heads", [" ", ",", ""])
def test_blank_heads_are_refused(heads, tmp_path, monkeypatch):
    code, out = cli(["edit", "scale", "--heads", heads, "--factor", "0", "--out", "e.json"], tmp_path, monkeypatch)
    one_line(code, out, "names no head")
    assert not (tmp_path / "e.json").exists()


def test_exported_checkpoints_are_never_applied_as_nothing(default_model, tmp_path, monkeypatch):
    from headsteer.ask import default_image

    model, proc = default_model
    ad = headsteer.get_adapter(model, proc)
    inputs = ad.encode([default_image()], ["what shape is in the image?"])
    baked = tmp_path / "baked"
    export(model, proc, EditManifest("scale", "L2H0-7", {"factor": 0.0}), baked)
    code, out = cli(["ask", "--edit", str(baked)], tmp_path, monkeypatch)  # its manifest on the base model: nothing
    one_line(code, out, "baked")
    with pytest.raises(HeadsteerError, match="baked"):
        export(model, proc, EditManifest.load(baked), tmp_path / "again")
    attn = EditManifest("attn", "L2H0-7,L3H0-7", {"alpha": -1.0})
    export(model, proc, attn, tmp_path / "attn")
    with pytest.raises(HeadsteerError, match="load_edited"):  # loading alone would drop the edit
        headsteer.load(tmp_path / "attn")
    edited, eproc = load_edited(tmp_path / "attn")
    with torch.no_grad(), apply_edit(model, attn, proc):
        want = model(**inputs).logits[0, -1]
    with torch.no_grad():
        got = edited(**headsteer.get_adapter(edited, eproc).encode([default_image()], ["what shape is in the image?"])).logits[0, -1]
    assert torch.allclose(got, want, atol=1e-5)


def test_an_edit_of_other_weights_is_refused_in_every_dtype(default_model):
    from headsteer.fingerprint import weights_fingerprint

    model, _ = default_model
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.language_model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    mine, theirs = provenance(model), provenance(other)
    bf16, _ = headsteer.load("default", dtype="bf16")
    with pytest.raises(HeadsteerError, match="other weights"):
        with apply_edit(bf16, EditManifest("scale", "L0H0", {"factor": 0.5}, provenance=theirs)):
            pass
    with apply_edit(bf16, EditManifest("scale", "L0H0", {"factor": 0.5}, provenance=mine)):
        pass  # the same weights loaded in bf16
    old = {k: v for k, v in mine.items() if k != "base_hashes"}  # a manifest from before base_hashes
    with pytest.raises(HeadsteerError, match="older headsteer"):
        with apply_edit(bf16, EditManifest("scale", "L0H0", {"factor": 0.5}, provenance=old)):
            pass
    with apply_edit(model, EditManifest("scale", "L0H0", {"factor": 0.5}, provenance=old)):
        pass  # and in its own dtype it still reads
    assert weights_fingerprint(model) == mine["base_hash"]


def test_lora_rank_is_bounded_by_the_heads_slice(default_model, tmp_path, monkeypatch):
    from headsteer.edit.lora import train_head_lora

    model, proc = default_model
    with pytest.raises(HeadsteerError, match="--rank 16 or less"):
        train_head_lora(model, proc, HeadSet.parse("L0H0"), None, rank=17, targets=("q",))
    code, out = cli(["edit", "lora", "--heads", "L0H0", "--rank", "100000", "--out", "e.json"], tmp_path, monkeypatch)
    one_line(code, out, "--rank")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- 6. the library's entry points --------------------------------------------------------------------

def test_per_example_rows_must_fit_the_batch(default_model):
    from headsteer.baseline import make_baseline
    from headsteer.intervention import Knockout

    model, proc = default_model
    ad = headsteer.get_adapter(model, proc)
    inputs = ad.encode([headsteer.ask.default_image()], ["what shape is in the image?"])
    with torch.no_grad():
        clean = model(**inputs).logits
    T = inputs["input_ids"].shape[1]
    zero = make_baseline(model, proc, "zero")
    for kw in ({"head_scale": torch.ones(3, 4, 8)}, {"ablate": torch.ones(3, 4, 8, dtype=torch.bool), "baseline": zero},
               {"knockouts": [Knockout(torch.ones(3, T, dtype=torch.bool), "last")]}):
        with pytest.raises(HeadsteerError, match="batch of 1"):
            with torch.no_grad(), intervene(model, **kw):
                model(**inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, clean)  # restored after the refusal


def test_library_entry_points_refuse_what_is_not_theirs(default_model):
    from headsteer.attribution import ablated_logits
    from headsteer.heads import random_heads

    model, proc = default_model
    for thing in (model.model.vision_tower, model.lm_head, "model", None):
        with pytest.raises(HeadsteerError):
            intervene(thing, head_scale=torch.ones(4, 8))
    for empty in (torch.zeros(0, 4, 8, dtype=torch.bool), []):
        with pytest.raises(HeadsteerError, match="no mask"):
            ablated_logits(model, proc, headsteer.ask.default_image(), "what shape?", empty, baseline="zero")
    with pytest.raises(HeadsteerError, match="seed"):
        random_heads(2, 4, 8, seed=-1)


@pytest.mark.parametrize("args", [["edit", "scale", "--heads", "random:2", "--seed", "-1", "--factor", "0", "--out", "e.json"],
                                  ["attribute", "--seed", "-1"]])
def test_negative_seeds_are_usage_errors(args, tmp_path, monkeypatch):
    code, out = cli(args, tmp_path, monkeypatch)
    one_line(code, out, "--seed", exit_code=2)
