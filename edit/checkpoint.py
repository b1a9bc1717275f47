"""Export an edited model as a Hugging Face checkpoint (safetensors, config, processor files and
the manifest). Weight-expressible edits are baked in, so the directory loads in plain
transformers; the others keep the base weights and ``headsteer.edit.load_edited`` re-applies them.
Writes go to a temporary directory that is renamed into place; ``force`` replaces only a checkpoint
headsteer exported, by a swap of renames (see ``export``)."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
from pathlib import Path

from headsteer.adapters import get_adapter
from headsteer.errors import HeadsteerError
from headsteer.files import umask
from headsteer.loading import load

from .apply import install_edit
from .kinds import KINDS
from .manifest import EditManifest

MANIFEST_NAME = "headsteer_edit.json"


def baked_weights(model, manifest, ad):
    """A context in which the model's weights carry the edit, or None if it cannot be baked into this
    model's weights (``EditKind.not_bakeable`` says why)."""
    kind = KINDS[manifest.kind]
    return None if kind.not_bakeable(ad) is not None else kind.weights(manifest, model, ad)


_TMP = ".headsteer-export-"  # .NAME.headsteer-export-PID-XXXX: a checkpoint being written
_OLD = ".headsteer-old-"  # .NAME.headsteer-old-PID-XXXX: the checkpoint being replaced
_MARK = ".headsteer-export-in-progress"  # inside a temporary checkpoint until it is complete


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _own_checkpoint(folder: Path) -> dict | None:
    """The manifest of a checkpoint headsteer exported to ``folder``, or None."""
    try:
        d = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("kind") in KINDS and "heads" in d else None


def _clean_stale(out: Path):
    """Temporary folders of exports to ``out`` that were killed (their process is gone): a half-written
    new checkpoint is deleted; a replaced old one is put back if ``out`` is missing, else deleted.
    Only folders with headsteer's names and marks are touched."""
    for d in out.parent.glob(glob.escape(f".{out.name}") + ".headsteer-*-*"):
        kind = _TMP if d.name.startswith(f".{out.name}{_TMP}") else _OLD if d.name.startswith(f".{out.name}{_OLD}") else None
        pid = d.name[len(f".{out.name}") + len(kind or ""):].split("-", 1)[0] if kind else ""
        if not kind or not pid.isdigit() or not d.is_dir() or d.is_symlink() or _pid_alive(int(pid)):
            continue
        if kind == _TMP and ((d / _MARK).exists() or _own_checkpoint(d) is not None):
            shutil.rmtree(d, ignore_errors=True)
        elif kind == _OLD and _own_checkpoint(d) is not None:
            if not out.exists():
                os.rename(d, out)  # the kill came between the two renames of a replacement
            else:
                shutil.rmtree(d, ignore_errors=True)


def _check_out(out: Path, force: bool) -> bool:
    """Whether ``out`` holds a checkpoint to replace; refuses everything else in one line."""
    res = out.resolve()
    if res == Path.cwd().resolve() or res in Path.cwd().resolve().parents or res == Path.home().resolve():
        raise HeadsteerError(f"--out {out} is the current directory, one above it or your home folder: give a new "
                             "folder for the checkpoint (e.g. --out ckpt-edit)")
    if out.exists() and not out.is_dir():
        raise HeadsteerError(f"--out {out} is a file, not a folder: choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return False
    old = _own_checkpoint(out)
    if old is None:
        raise HeadsteerError(f"--out {out} is not empty and is not a checkpoint exported by headsteer (no "
                             f"{MANIFEST_NAME}): choose another --out (headsteer never deletes it, even with --force)")
    if not force:
        raise HeadsteerError(f"--out {out} holds an exported checkpoint: pass --force to replace it or choose another --out")
    listed = old.get("provenance", {}).get("checkpoint_files") if isinstance(old.get("provenance"), dict) else None
    if isinstance(listed, list):
        extra = sorted(set(p.name for p in out.iterdir()) - set(listed))
        if extra:
            raise HeadsteerError(f"--out {out} holds files the export did not write ({', '.join(extra[:5])}): move them "
                                 "away or choose another --out; --force replaces only what headsteer wrote")
    return True


def export(model, processor, manifest: EditManifest, out_dir, force: bool = False, allow_other_model: bool = False) -> dict:
    """Write the edited checkpoint to ``out_dir``; returns {"baked": bool, "path": str}.

    ``force`` replaces only a checkpoint headsteer exported (recognised by its manifest, holding
    nothing else), atomically: the new checkpoint is written beside it, the two are swapped by
    renames, then the old one is deleted. Temporary folders of killed exports are cleaned first.

    >>> import headsteer
    >>> from headsteer.edit import EditManifest
    >>> model, processor = headsteer.load("default")
    >>> export(model, processor, EditManifest("scale", "L2H0-3", {"factor": 0.0}), "ckpt-scale0")["baked"]
    True
    """
    ad = get_adapter(model, processor)
    manifest.validate()
    manifest.headset(ad)
    manifest.check_base(model, allow_other_model=allow_other_model)
    out = Path(out_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HeadsteerError(f"cannot create {out.parent} for --out: {e.strerror}; choose another --out") from None
    _clean_stale(out)
    replace = _check_out(out, force)
    adapter = manifest.adapter_path() if manifest.kind == "lora" else None
    tmp = out.parent / f".{out.name}{_TMP}{os.getpid()}-{secrets.token_hex(3)}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise HeadsteerError(f"cannot write in {out.parent}: {e.strerror}; choose another --out") from None
    try:
        (tmp / _MARK).touch()
        ctx = baked_weights(model, manifest, ad)
        baked = ctx is not None
        with ctx if baked else contextlib.nullcontext():
            model.save_pretrained(tmp, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        if adapter is not None and adapter.is_dir():
            shutil.copytree(adapter, tmp / "lora_adapter", symlinks=True)
        saved = EditManifest(kind=manifest.kind, heads=manifest.heads, params=dict(manifest.params),
                             provenance=dict(manifest.provenance), baked=baked)
        if adapter is not None:
            saved.params["adapter_dir"] = "lora_adapter"
        if not baked and manifest.tensor_data:
            saved.with_tensors(manifest.tensor_data)
            saved.tensors = Path(MANIFEST_NAME).stem + ".tensors.safetensors"
        names = {p.name for p in tmp.iterdir()} - {_MARK}
        saved.provenance["checkpoint_files"] = sorted(names | {MANIFEST_NAME} | ({saved.tensors} if saved.tensors else set()))
        saved.save(tmp / MANIFEST_NAME)
        _umask_permissions(tmp)
        (tmp / _MARK).unlink()
        if replace:
            old = out.parent / f".{out.name}{_OLD}{os.getpid()}-{secrets.token_hex(3)}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.exists():
                out.rmdir()  # an empty folder
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"baked": baked, "path": str(out)}


def _umask_permissions(folder: Path):
    """Files written by transformers/safetensors get the permissions of a plain ``open``."""
    mode = 0o666 & ~umask()
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)
    os.chmod(folder, 0o777 & ~umask())


def load_edited(path, allow_other_model: bool = False, **load_kwargs):
    """Load an exported checkpoint; edits that are not in its weights are re-applied (installed)."""
    model, processor = load(path, **load_kwargs)
    mp = Path(path) / MANIFEST_NAME
    if mp.exists():
        manifest = EditManifest.load(mp)
        if not manifest.baked:
            install_edit(model, manifest, processor, allow_other_model=allow_other_model)
    return model, processor
