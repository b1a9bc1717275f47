"""What happens to users' files: export --force replaces only its own checkpoint by a swap, killed
exports are cleaned, a manifest cannot reach outside its folder, base_hash is checked, edit does not
overwrite a manifest, one process per run folder, outputs get the umask's permissions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import headsteer
from headsteer import HeadsteerError
from headsteer.edit import EditManifest, apply_edit, export
from headsteer.edit.manifest import provenance


@pytest.fixture(scope="module")
def mp():
    return headsteer.load("default")


def test_force_swaps_in_the_new_checkpoint_and_cleans_killed_exports(mp, tmp_path):
    model, proc = mp
    out = tmp_path / "ck"
    export(model, proc, EditManifest("scale", "L0H0", {"factor": 0.0}), out)
    # leftovers of a killed export (pid 999999 is not running): a half-written checkpoint, and a
    # replaced one whose swap was interrupted; and a user's folder that merely looks alike
    half = tmp_path / ".ck.headsteer-export-999999-abc"
    half.mkdir()
    (half / ".headsteer-export-in-progress").touch()
    user = tmp_path / ".ck.headsteer-export-999999-usr"
    user.mkdir()
    (user / "mine.txt").write_text("x")
    export(model, proc, EditManifest("scale", "L0H0", {"factor": 2.0}), out, force=True)
    assert EditManifest.load(out).params["factor"] == 2.0
    assert not half.exists() and (user / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ck.")) == [user.name]
    # a swap killed between its two renames: the old checkpoint is put back
    os.rename(out, tmp_path / ".ck.headsteer-old-999999-def")
    export(model, proc, EditManifest("scale", "L0H0", {"factor": 3.0}), tmp_path / "ck", force=True)
    assert EditManifest.load(out).params["factor"] == 3.0 and not (tmp_path / ".ck.headsteer-old-999999-def").exists()
    mode = 0o666 & ~headsteer.files.umask()
    assert (out / "model.safetensors").stat().st_mode & 0o777 == mode


def test_force_refuses_a_checkpoint_holding_a_users_file(mp, tmp_path):
    model, proc = mp
    out = tmp_path / "ck"
    export(model, proc, EditManifest("scale", "L0H0", {"factor": 0.0}), out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(HeadsteerError, match="notes.txt"):
        export(model, proc, EditManifest("scale", "L0H0", {"factor": 1.0}), out, force=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_manifest_paths_are_confined_and_base_hash_is_checked(mp, tmp_path):
    model, proc = mp
    (tmp_path / "m.json").write_text(json.dumps({"kind": "lora", "heads": "L0H0", "params": {"adapter_dir": "/etc"}}))
    with pytest.raises(HeadsteerError, match="outside the manifest's folder"):
        EditManifest.load(tmp_path / "m.json")
    prov = provenance(model)
    assert len(prov["base_hash"]) == 64 and prov["base_hash_kind"] == "weights-sha256-v1"
    other = EditManifest("scale", "L0H0", {"factor": 1.0}, provenance={**prov, "base_hash": "f" * 64})
    with pytest.raises(HeadsteerError, match="allow-other-model"):
        with apply_edit(model, other):
            pass
    with apply_edit(model, other, allow_other_model=True):
        pass
    same = EditManifest("scale", "L0H0", {"factor": 1.0}, provenance=prov)
    with apply_edit(model, same):
        pass
    old = EditManifest("scale", "L0H0", {"factor": 1.0}, provenance={"base_hash": "0123456789abcdef"})  # older, sampled
    with pytest.raises(HeadsteerError, match="other weights"):
        with apply_edit(model, old):
            pass


def test_edit_refuses_an_existing_manifest_without_force(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from headsteer.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["edit", "scale", "--heads", "L0H0", "--factor", "0", "--out", "e.json"]
    assert CliRunner().invoke(main, args).exit_code == 0
    before = (tmp_path / "e.json").read_text()
    r = CliRunner().invoke(main, [*args[:-3], "2", "--out", "e.json"])
    assert r.exit_code == 1 and "--force" in r.output and (tmp_path / "e.json").read_text() == before
    assert CliRunner().invoke(main, [*args[:-3], "2", "--out", "e.json", "--force"]).exit_code == 0
    assert json.loads((tmp_path / "e.json").read_text())["params"]["factor"] == 2.0


def test_a_second_process_on_a_run_folder_is_refused(tmp_path):
    from headsteer.rundir import open_run

    ident = {"command": "eval", "settings": {"a": 1}, "edit": None}
    open_run(tmp_path / "run", ident)
    code = textwrap.dedent(f"""
        from headsteer.rundir import open_run
        open_run({str(tmp_path / 'run')!r}, {ident!r})
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "in use by another headsteer process" in r.stderr
    assert open_run(tmp_path / "run", ident).resumed  # the holder itself may reopen it
    assert (tmp_path / "run" / "headsteer.log").exists()
