"""The second hardening sweep, files: no user file lost (``--force`` trusts only a verified record of
what the export wrote), no file read from outside what the user named (symlinks resolved, tensors
checked against the heads and modules the manifest names), no read that blocks or loops (pipes,
devices, symlink loops), and a full disk leaves nothing half-written. One default model is shared."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import headsteer
from headsteer import HeadsteerError
from headsteer.cli import main
from headsteer.edit import EditManifest, apply_edit, export


@pytest.fixture
def no_hang():
    """A read that blocks (a named pipe) fails the test instead of hanging the suite."""
    def boom(*_):
        raise TimeoutError("blocked on a read")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. ownership: --force deletes only what a verified record lists ----------------------------------

def test_a_bare_manifest_beside_users_files_authorises_nothing(default_model, tmp_path):
    model, proc = default_model
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    (user / "data.csv").write_text("a,b\n")
    good = {"kind": "scale", "heads": "L0H0", "params": {"factor": 0.0}}
    forged = [
        good,                                                                    # no record at all
        {**good, "provenance": {"checkpoint_files": ["thesis.tex", "data.csv"]}},  # names only (older exports)
        {**good, "provenance": {"checkpoint_files": {"thesis.tex": {"size": 13, "sha256": "0" * 64}}}},  # wrong hash
        {**good, "provenance": {"checkpoint_files": {"../x": {"size": 1, "sha256": "0" * 64}}}},  # outside the folder
    ]
    for manifest in forged:
        (user / "headsteer_edit.json").write_text(json.dumps(manifest))
        before = files_of(user)
        with pytest.raises(HeadsteerError, match="exactly a checkpoint headsteer exported"):
            export(model, proc, EditManifest("scale", "L0H0", {"factor": 1.0}), user, force=True)
        assert files_of(user) == before
    r = CliRunner().invoke(main, ["export", "--edit", str(user / "headsteer_edit.json"), "--out", str(user), "--force"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and (user / "thesis.tex").exists(), r.output


def test_force_replaces_only_an_unchanged_export(default_model, tmp_path):
    model, proc = default_model
    out = tmp_path / "ck"
    export(model, proc, EditManifest("scale", "L0H0", {"factor": 0.0}), out)
    listed = EditManifest.load(out).provenance["checkpoint_files"]
    assert {"model.safetensors", "config.json"} <= set(listed)
    assert all(len(v["sha256"]) == 64 and v["size"] == (out / k).stat().st_size for k, v in listed.items())
    # a file the export wrote, changed since (the user edited config.json): not headsteer's any more
    cfg = (out / "config.json").read_text()
    (out / "config.json").write_text(cfg.replace('"model_type"', ' "model_type"', 1))
    with pytest.raises(HeadsteerError, match="config.json was changed"):
        export(model, proc, EditManifest("scale", "L0H0", {"factor": 2.0}), out, force=True)
    (out / "config.json").write_text(cfg)
    # a file replaced by a symlink to the user's file: refused, the user's file untouched
    secret = tmp_path / "secret.txt"
    secret.write_text("keep")
    (out / "generation_config.json").unlink()
    (out / "generation_config.json").symlink_to(secret)
    with pytest.raises(HeadsteerError, match="generation_config.json"):
        export(model, proc, EditManifest("scale", "L0H0", {"factor": 2.0}), out, force=True)
    assert secret.read_text() == "keep"


def test_edit_force_replaces_only_files_its_manifest_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "e_adapter").mkdir()
    (tmp_path / "e_adapter" / "notes.txt").write_text("mine")
    r = CliRunner().invoke(main, ["edit", "lora", "--heads", "L0H0", "--steps", "1", "--out", "e.json", "--force"])
    assert r.exit_code == 1 and "names it as its own" in r.output and (tmp_path / "e_adapter" / "notes.txt").exists(), r.output
    (tmp_path / "e.tensors.safetensors").write_text("user data")
    r = CliRunner().invoke(main, ["edit", "steer", "--heads", "L0H0", "--out", "e.json", "--force"])
    assert r.exit_code == 1 and "e.tensors.safetensors" in r.output
    assert (tmp_path / "e.tensors.safetensors").read_text() == "user data"


# -- 1. confinement: resolved paths, tensors matching the manifest ------------------------------------

def test_tensor_files_and_adapters_may_not_reach_out_through_symlinks(default_model, tmp_path):
    model, _ = default_model
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"vectors": torch.zeros(4, 8, 16)}, str(outside / "v.safetensors"))
    d = tmp_path / "edit"
    d.mkdir()
    (d / "t.safetensors").symlink_to(outside / "v.safetensors")
    (d / "steer.json").write_text(json.dumps({"kind": "steer", "heads": "L0H0", "params": {}, "tensors": "t.safetensors"}))
    with pytest.raises(HeadsteerError, match="outside the manifest's folder"):
        EditManifest.load(d / "steer.json")
    # a LoRA adapter folder that is a link out, or holds one
    (d / "ad_link").symlink_to(outside, target_is_directory=True)
    (d / "lora1.json").write_text(json.dumps({"kind": "lora", "heads": "L0H0", "params": {"adapter_dir": "ad_link"}}))
    with pytest.raises(HeadsteerError, match="outside the manifest's folder"):
        EditManifest.load(d / "lora1.json")
    (d / "ad").mkdir()
    (d / "ad" / "adapter_model.safetensors").symlink_to(outside / "v.safetensors")
    (d / "lora2.json").write_text(json.dumps({"kind": "lora", "heads": "L0H0", "params": {"adapter_dir": "ad"}}))
    with pytest.raises(HeadsteerError, match="symlink to .* outside it"):
        EditManifest.load(d / "lora2.json").adapter_path()


def _lora(model, ad, layer, proj, rows_of_head, extra=None, rank=2):
    """A LoRA manifest for L{layer}H0 whose B rows are non-zero for the given heads (q_proj)."""
    name = next(n for n, m in model.named_modules() if m is getattr(ad.attention[layer], f"{proj}_proj"))
    w = dict(model.named_modules())[name].weight
    a = torch.randn(rank, w.shape[1]) * 0.1
    b = torch.zeros(w.shape[0], rank)
    for h in rows_of_head:
        b[h * ad.head_dim : (h + 1) * ad.head_dim] = torch.randn(ad.head_dim, rank)
    tensors = {f"{name}.lora_A": a, f"{name}.lora_B": b, **(extra or {})}
    return EditManifest("lora", "L2H0", {"scaling": 1.0, "rank": rank, "targets": ["q"]}).with_tensors(tensors)


def test_lora_tensors_must_stay_on_the_manifests_heads(default_model):
    model, proc = default_model
    ad = headsteer.get_adapter(model, proc)
    lm = model.lm_head.weight
    rogue = {"lm_head.lora_A": torch.randn(2, lm.shape[1]), "lm_head.lora_B": torch.randn(lm.shape[0], 2)}
    before = lm.detach().clone()
    for bad, why in ((_lora(model, ad, 2, "q", [0], rogue), "lm_head"),         # reaches the output layer
                     (_lora(model, ad, 3, "q", [0]), "layers.3"),              # another layer
                     (_lora(model, ad, 2, "q", [0, 1]), "outside L2H0")):      # another head of the layer
        with pytest.raises(HeadsteerError, match=why):
            with apply_edit(model, bad, proc):
                pass
        assert torch.equal(model.lm_head.weight, before)
    good = _lora(model, ad, 2, "q", [0])
    q = ad.attention[2].q_proj.weight
    q0 = q.detach().clone()
    with apply_edit(model, good, proc):
        changed = (q != q0).any(dim=1)
        assert changed[: ad.head_dim].any() and not changed[ad.head_dim:].any()
    assert torch.equal(q, q0)


def test_steer_vectors_outside_the_heads_are_masked(default_model):
    """Decided: a steer's vectors act only on its heads; values elsewhere in the file are ignored."""
    model, proc = default_model
    ad = headsteer.get_adapter(model, proc)
    inputs = ad.encode([headsteer.ask.default_image()], ["what shape is in the image?"])
    full = torch.randn(4, 8, 16)
    only = torch.zeros_like(full)
    only[2, 0] = full[2, 0]
    out = []
    for vec in (full, only):
        m = EditManifest("steer", "L2H0", {"strength": 1.0}).with_tensors({"vectors": vec})
        with torch.no_grad(), apply_edit(model, m, proc):
            out.append(model(**inputs).logits[0, -1])
    assert torch.equal(out[0], out[1])


# -- 5. reads that would block, never end or loop -----------------------------------------------------

def test_pipes_devices_and_loops_are_refused_without_blocking(default_model, tmp_path, no_hang):
    from headsteer.data import load_local_vqa
    from headsteer.eval import load_pope
    from headsteer.images import open_image

    model, proc = default_model
    ad = headsteer.get_adapter(model, proc)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    for bad, what in ((fifo, "named pipe"), (loop, "symlink loop"), ("/dev/zero", "character device")):
        with pytest.raises(HeadsteerError, match=what):
            open_image(bad)
        with pytest.raises(HeadsteerError, match=what):
            ad.encode([bad], ["what shape?"])
    os.mkfifo(tmp_path / "data.jsonl")
    with pytest.raises(HeadsteerError, match="named pipe"):
        load_local_vqa(tmp_path / "data.jsonl")
    with pytest.raises(HeadsteerError, match="named pipe"):
        load_pope(tmp_path / "data.jsonl")
    os.mkfifo(tmp_path / "edit.json")
    with pytest.raises(HeadsteerError, match="named pipe"):
        EditManifest.load(tmp_path / "edit.json")
    row = {"image": "pipe.png", "question": "what shape?", "answer": "circle"}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(HeadsteerError, match="named pipe"):
        load_local_vqa(tmp_path / "rows.jsonl")


def test_model_folders_with_pipes_or_loops_are_named(tmp_path, no_hang):
    src = Path(headsteer.default_model_path())
    ck = tmp_path / "ck"
    ck.mkdir()
    for p in src.iterdir():
        (ck / p.name).symlink_to(p)
    os.mkfifo(ck / "notes.fifo")
    with pytest.raises(HeadsteerError, match="named pipe"):
        headsteer.load(ck)
    os.unlink(ck / "notes.fifo")
    (ck / "tokenizer.json").unlink()
    (ck / "tokenizer.json").symlink_to(ck / "tokenizer.json")
    with pytest.raises(HeadsteerError, match="symlink loop"):
        headsteer.load(ck)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    r = CliRunner().invoke(main, ["info", "--model", str(tmp_path / "loop")])
    assert r.exit_code == 1 and "symlink loop" in r.output and "No such file" not in r.output, r.output


def test_baseline_cache_that_is_not_a_writable_folder_is_named(default_model, tmp_path, monkeypatch):
    from headsteer.baseline import make_baseline

    model, proc = default_model
    (tmp_path / "afile").write_text("x")
    for cache in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        monkeypatch.setenv("HEADSTEER_CACHE", str(cache))
        with pytest.raises(HeadsteerError, match="HEADSTEER_CACHE"):
            make_baseline(model, proc, "mean", reference=[_red()])


def _red():
    from PIL import Image

    return Image.new("RGB", (64, 64), (200, 30, 30))


# -- 5. disk full during export -----------------------------------------------------------------------

def test_export_under_a_file_size_limit_leaves_nothing_and_says_so(tmp_path):
    """RLIMIT_FSIZE below the weights' size: the write fails (EFBIG; Python ignores SIGXFSZ)."""
    (tmp_path / "e.json").write_text(json.dumps({"kind": "scale", "heads": "L0H0", "params": {"factor": 0.0}}))
    code = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        from headsteer.cli import main
        sys.argv = ["headsteer", "export", "--edit", "e.json", "--out", "ck"]
        main()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and "nothing was written" in err[0] and "unexpected" not in err[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json"]


def test_a_write_error_in_a_tensors_file_is_an_os_error(tmp_path, monkeypatch):
    import safetensors.torch

    from headsteer.files import save_safetensors

    def full(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="StorageFull"):
        save_safetensors({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_run_record_beside_users_files_deletes_none_of_them(tmp_path):
    from headsteer.rundir import open_run

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    forged = {"format": "headsteer-run-1", "hash": "0" * 64, "identity": {"command": "eval"},
              "written": ["thesis.tex", "rows.jsonl"]}
    (folder / "run.json").write_text(json.dumps(forged))
    (folder / "rows.jsonl").write_text("old rows\n")
    open_run(folder, {"command": "eval", "settings": {}}, force=True, outputs=["rows.jsonl"])
    assert (folder / "thesis.tex").read_text() == "years of work" and not (folder / "rows.jsonl").exists()
    # a record as open_run writes it (its hash is its identity's) is trusted: its own files go, the user's stay
    (folder / "rows.jsonl").write_text("rows\n")
    open_run(folder, {"command": "eval", "settings": {"a": 2}}, force=True, outputs=["rows.jsonl"])
    assert sorted(p.name for p in folder.iterdir()) == ["headsteer.log", "run.json", "thesis.tex"]
