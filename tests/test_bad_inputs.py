"""Every bad input a user can give ends in one line naming the fix: exit code 1 (2 for usage
errors), no traceback, nothing written. The CLI runs in-process (CliRunner) with one loaded default
model shared by every case (headsteer.load is cached here), so the table stays fast."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import headsteer
import headsteer.loading as load_module
from headsteer.cli import main

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A working folder with the files the cases read: manifests good and bad, data files, a user's
    folder, a plain file, an exported checkpoint."""
    d = tmp_path_factory.mktemp("bad")
    m, _ = headsteer.load("default")
    from headsteer.edit.manifest import provenance

    prov = provenance(m)
    good = {"kind": "scale", "heads": "L2H0-3", "params": {"factor": 0.0}, "provenance": prov}
    files = {
        "ok.json": good,
        "number.json": 12345,
        "factor_abc.json": {**good, "params": {"factor": "abc"}},
        "heads_int.json": {**good, "heads": 12345},
        "kind_bogus.json": {**good, "kind": "bogus"},
        "alpha_low.json": {**good, "kind": "attn", "params": {"alpha": -5}},
        "strength_inf.json": {**good, "kind": "steer", "params": {"strength": 1e999}},
        "adapter_ssh.json": {**good, "kind": "lora", "params": {"adapter_dir": "~/.ssh"}},
        "adapter_up.json": {**good, "kind": "lora", "params": {"adapter_dir": "../../etc"}},
        "tensors_up.json": {**good, "tensors": "../x.safetensors"},
        "params_list.json": {**good, "params": [1, 2]},
        "heads_range.json": {**good, "heads": "L9H0"},
        "heads_huge.json": {**good, "heads": "L0H0-3000000"},
        "other_model.json": {**good, "provenance": {**prov, "base_hash": "0" * 64}},
        "baked_str.json": {**good, "baked": "yes"},
        "no_kind.json": {"heads": "L0H0"},
    }
    for name, obj in files.items():
        (d / name).write_text(json.dumps(obj))
    (d / "factor_nan.json").write_text(json.dumps(good).replace('"factor": 0.0', '"factor": NaN'))
    (d / "broken.json").write_text('{"kind": "scale", "heads": ')
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(d / "red.png")
    row = {"image": "red.png", "question": "what color is the shape?", "answer": "red"}
    (d / "bad_line.jsonl").write_text(json.dumps(row) + "\n{not json\n")
    (d / "col_later.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({"image": "red.png", "answer": "red"}) + "\n")
    (d / "tag_q.jsonl").write_text(json.dumps({**row, "question": "<image> what color?"}) + "\n")
    (d / "no_answer.jsonl").write_text(json.dumps({"image": "red.png", "question": "q"}) + "\n")
    (d / "not_objects.json").write_text("[1, 2, 3]")
    (d / "latin1.csv").write_bytes("image,question,answer\nred.png,caf\xe9?,red\n".encode("latin-1"))
    (d / "userdir").mkdir()
    (d / "userdir" / "notes.txt").write_text("mine")
    (d / "afile").write_text("a file")
    (d / "notes.json").write_text("[]")
    from headsteer.edit import EditManifest, export

    export(m, _, EditManifest.load(d / "ok.json"), d / "ckpt")
    return d


@pytest.fixture(scope="module")
def runner(world):
    """In-process CLI with one shared default model (the cases that get as far as loading it)."""
    real = load_module.load
    cache = {}

    def cached(model="default", **kw):
        key = (str(model), tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = real(model, **kw)
        return cache[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(load_module, "load", cached)
    mp.setattr(headsteer, "load", cached, raising=False)
    mp.chdir(world)
    yield CliRunner()
    mp.undo()


def snapshot(root: Path):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


U, E = 2, 1  # exit codes: usage error, bad input
SCALE = ["edit", "scale", "--factor", "0", "--out", "e.json"]
CASES = [
    # -- usage errors (click: exit 2) ---------------------------------------------------------
    (["frobnicate"], U, "No such command"),
    (["eval", "--nope"], U, "No such option"),
    (["eval", "--batch-size", "0"], U, "--batch-size"),
    (["eval", "--limit", "-5"], U, "--limit"),
    (["eval", "--limit", "0"], U, "--limit"),
    (["eval", "--mode", "bogus"], U, "--mode"),
    (["eval", "--baseline", "foo"], U, "--baseline"),
    (["eval", "--dtype", "int8"], U, "--dtype"),
    (["compare", "--limit", "0", "--edits", "ok.json"], U, "--limit"),
    (["edit", "scale", "--heads", "L0H0", "--factor", "nan", "--out", "e.json"], U, "finite"),
    (["edit", "scale", "--heads", "L0H0", "--factor", "inf", "--out", "e.json"], U, "finite"),
    (["edit", "scale", "--heads", "L0H0", "--factor", "abc", "--out", "e.json"], U, "not a number"),
    (["edit", "scale", "--heads", "L0H0", "--out", "e.json"], U, "--factor"),
    (["edit", "attn", "--heads", "L0H0", "--alpha", "nan", "--out", "e.json"], U, "finite"),
    (["edit", "attn", "--heads", "L0H0", "--alpha", "-2", "--out", "e.json"], U, ">= -1"),
    (["edit", "steer", "--heads", "L0H0", "--n", "0", "--out", "e.json"], U, "--n"),
    (["edit", "steer", "--heads", "L0H0", "--method", "foo", "--out", "e.json"], U, "--method"),
    (["edit", "steer", "--heads", "L0H0", "--strength", "nan", "--out", "e.json"], U, "finite"),
    (["edit", "lora", "--heads", "L0H0", "--steps", "0", "--out", "e.json"], U, "--steps"),
    (["edit", "lora", "--heads", "L0H0", "--lr", "0", "--out", "e.json"], U, "--lr"),
    (["edit", "lora", "--heads", "L0H0", "--rank", "0", "--out", "e.json"], U, "--rank"),
    (["edit", "lora", "--heads", "L0H0", "--batch-size", "0", "--out", "e.json"], U, "--batch-size"),
    (["edit", "scale", "--from-attribution", "x", "--top-k", "0", "--factor", "0", "--out", "e.json"], U, "--top-k"),
    (["edit", "scale", "--heads", "L0H0", "--factor", "0"], U, "--out"),
    (["export", "--out", "ck2"], U, "--edit"),
    (["info", "--dtype", "fp64"], U, "--dtype"),
    (["ask", "--top", "0"], U, "--top"),
    (["ask", "--top", "100000"], U, "--top"),
    (["flow", "--n-images", "0"], U, "--n-images"),
    (["flow", "--window", "0"], U, "--window"),
    (["flow", "--measure", "logit"], U, "--measure"),
    (["flow", "--top-k", "0"], U, "--top-k"),
    # -- bad input (one line, exit 1) ---------------------------------------------------------
    (["info", "--device", "tpu9"], E, "tpu9"),
    pytest.param(["info", "--device", "cuda"], E, "cuda", marks=pytest.mark.skipif(not NO_CUDA, reason="CUDA exists")),
    (["info", "--model", "no/such/dir"], E, "no/such/dir"),
    (["info", "--model", "afile"], E, "afile"),
    ([*SCALE, "--heads", "L0H0-3000000"], E, "out of range"),
    ([*SCALE, "--heads", "random:999"], E, "random:K"),
    ([*SCALE, "--heads", "random:-1"], E, "random:K"),
    ([*SCALE, "--heads", "random:x"], E, "random:K"),
    ([*SCALE, "--heads", "x"], E, "cannot parse head"),
    ([*SCALE, "--heads", "L9H0"], E, "out of range"),
    ([*SCALE, "--heads", "L3-1H0"], E, "lower index first"),
    (SCALE, E, "say which heads"),
    ([*SCALE, "--heads", "L0H0", "--from-attribution", "userdir"], E, "not both"),
    ([*SCALE, "--from-attribution", "userdir"], E, "not an attribution run"),
    (["edit", "scale", "--heads", "L0H0", "--factor", "0", "--out", "userdir"], E, "is a folder"),
    (["edit", "scale", "--heads", "L0H0", "--factor", "0", "--out", "afile/e.json"], E, "is a file"),
    (["edit", "scale", "--heads", "L0H0", "--factor", "0", "--out", "ok.json"], E, "--force"),
    (["edit", "scale", "--heads", "L0H0", "--factor", "0", "--out", "e.txt"], E, ".json"),
    (["edit", "scale", "--heads", "L0H0", "--factor", "0", "--out", "notes.json", "--force"], E, "not an edit manifest"),
    (["edit", "steer", "--heads", "L0H0", "--contrast", "bogus", "--out", "e.json"], E, "--contrast"),
    (["edit", "lora", "--heads", "L0H0", "--targets", "x", "--out", "e.json"], E, "--targets"),
    (["export", "--edit", "number.json", "--out", "ck2"], E, "JSON int"),
    (["export", "--edit", "factor_abc.json", "--out", "ck2"], E, "finite number"),
    (["export", "--edit", "factor_nan.json", "--out", "ck2"], E, "finite number"),
    (["export", "--edit", "heads_int.json", "--out", "ck2"], E, "heads must be text"),
    (["export", "--edit", "kind_bogus.json", "--out", "ck2"], E, "unknown edit kind"),
    (["export", "--edit", "alpha_low.json", "--out", "ck2"], E, ">= -1"),
    (["export", "--edit", "strength_inf.json", "--out", "ck2"], E, "finite number"),
    (["export", "--edit", "adapter_ssh.json", "--out", "ck2"], E, "outside the manifest's folder"),
    (["export", "--edit", "adapter_up.json", "--out", "ck2"], E, "outside the manifest's folder"),
    (["export", "--edit", "tensors_up.json", "--out", "ck2"], E, "beside the manifest"),
    (["export", "--edit", "params_list.json", "--out", "ck2"], E, "params must be"),
    (["export", "--edit", "baked_str.json", "--out", "ck2"], E, "baked"),
    (["export", "--edit", "no_kind.json", "--out", "ck2"], E, "missing kind"),
    (["export", "--edit", "broken.json", "--out", "ck2"], E, "JSON error"),
    (["export", "--edit", "missing.json", "--out", "ck2"], E, "not found"),
    (["export", "--edit", "heads_range.json", "--out", "ck2"], E, "out of range"),
    (["export", "--edit", "heads_huge.json", "--out", "ck2"], E, "out of range"),
    (["export", "--edit", "other_model.json", "--out", "ck2"], E, "--allow-other-model"),
    (["export", "--edit", "ok.json", "--out", ".", "--force"], E, "current directory"),
    (["export", "--edit", "ok.json", "--out", "userdir", "--force"], E, "not a checkpoint exported by headsteer"),
    (["export", "--edit", "ok.json", "--out", "afile"], E, "is a file"),
    (["export", "--edit", "ok.json", "--out", "ckpt"], E, "--force"),
    (["export", "--edit", "ok.json", "--out", "afile/ck"], E, "afile"),
    (["eval", "--edit", "number.json"], E, "JSON int"),
    (["eval", "--edit", "factor_nan.json"], E, "finite number"),
    (["eval", "--metrics", "bogus"], E, "--metrics"),
    (["eval", "--qtype", "nonexist"], E, "no questions"),
    (["eval", "--data", "bad_line.jsonl"], E, "bad_line.jsonl:2"),
    (["eval", "--data", "col_later.jsonl"], E, "example 2: missing question"),
    (["eval", "--data", "tag_q.jsonl"], E, "image placeholder"),
    (["eval", "--data", "no_answer.jsonl"], E, "missing column"),
    (["eval", "--data", "not_objects.json"], E, "one object per example"),
    (["eval", "--data", "latin1.csv"], E, "UTF-8"),
    (["eval", "--data", "nowhere.jsonl"], E, "not found"),
    (["eval", "--limit", "2", "--metrics", "accuracy", "--out", "afile"], E, "is a file"),
    (["eval", "--limit", "2", "--metrics", "accuracy", "--out", "afile/sub"], E, "is a file"),
    (["eval", "--limit", "2", "--metrics", "accuracy", "--out", "userdir"], E, "not written by headsteer"),
    (["compare", "--limit", "2"], E, "no edits"),
    (["compare", "--edits", "number.json", "--limit", "2"], E, "JSON int"),
    (["ask", "--question", "<image> what color is the shape?"], E, "image placeholder"),
    (["ask", "--image", "missing.png"], E, "missing.png"),
    (["ask", "--edit", "factor_nan.json"], E, "finite number"),
    (["ask", "--edit", "other_model.json"], E, "--allow-other-model"),
    (["flow", "--heads", "x", "--n-images", "1"], E, "cannot parse head"),
    (["flow", "--qtype", "nonexist"], E, "no questions"),
    (["flow", "--window", "99", "--n-images", "1"], E, "--window"),
    (["flow", "--n-images", "1", "--out", "afile"], E, "is a file"),
    (["attribute", "--masks", "0"], E, "--masks"),
    (["attribute", "--masks", "1"], E, "--masks"),
    (["attribute", "--masks", "3"], E, "--masks"),
    (["attribute", "--out", "afile", "--n-images", "1", "--masks", "10"], E, "is a file"),
    (["attribute", "--n-images", "0"], U, "--n-images"),
    (["attribute", "--k-max", "0", "--n-images", "1"], U, "--k-max"),
    (["attribute", "--qtype", "nonexist"], E, "no questions"),
]


def test_the_table_is_large():
    assert len(CASES) >= 60


@pytest.mark.parametrize("args,code,needle", CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_is_one_line(runner, world, args, code, needle):
    before = snapshot(world)
    r = runner.invoke(main, args)
    out = r.output.strip()
    assert r.exit_code == code, out
    assert "Traceback" not in out and not isinstance(r.exception, (AssertionError, TypeError, KeyError))
    assert len(out.splitlines()) == 1, out
    assert out.startswith("Error: ") and needle in out, out
    assert snapshot(world) == before, "a refused command wrote or changed files"


def test_debug_shows_the_traceback(runner):
    r = runner.invoke(main, ["--debug", "export", "--edit", "number.json", "--out", "ck2"])
    assert r.exit_code != 0 and r.exception is not None and not isinstance(r.exception, SystemExit)


def test_library_raises_headsteer_error():
    from headsteer import HeadSet, HeadsteerError

    for bad in (123, None, 1.5, [(1, "a")]):
        with pytest.raises(HeadsteerError):
            HeadSet.parse(bad)
    for bad in ("{bad", '{"x": 1}', "5"):
        with pytest.raises(HeadsteerError):
            HeadSet.from_json(bad)
    with pytest.raises(HeadsteerError, match="out of range"):
        HeadSet.parse("L0H0-3000000", 4, 8)
    with pytest.raises(HeadsteerError, match="larger than any model"):
        HeadSet.parse("L0H0-3000000")
    from headsteer.edit import EditManifest

    for kw in ({"params": {"factor": float("nan")}}, {"params": {"factor": "abc"}}, {"heads": 12345}):
        with pytest.raises(HeadsteerError):
            EditManifest(**{"kind": "scale", "heads": "L0H0", **kw})
