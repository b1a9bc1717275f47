"""Export an edited model as a Hugging Face checkpoint (safetensors, config, processor files and
the manifest). Weight-expressible edits are baked in, so the directory loads in plain
transformers; the others keep the base weights and ``headsteer.edit.load_edited`` re-applies them.
Writes go to a temporary directory that is renamed into place; ``force`` replaces only a checkpoint
headsteer exported, by a swap of renames (see ``export``)."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
from pathlib import Path

from safetensors import SafetensorError

import headsteer.loading
from headsteer.errors import HeadsteerError
from headsteer.files import save_safetensors, umask

from .apply import check_edit, install_edit
from .kinds import KINDS
from .manifest import EditManifest

MANIFEST_NAME = "headsteer_edit.json"
log = logging.getLogger("headsteer")


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(folder: Path, skip=()) -> dict:
    """{relative path: {"size", "sha256"}} of every file under ``folder`` (a checkpoint being written)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in skip:
            out[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return out


def ownership(folder: Path) -> tuple[dict | None, str]:
    """(manifest, "") if ``folder`` is a checkpoint headsteer exported and nothing has changed in it
    since: its manifest lists every file the export wrote with its size and SHA-256
    (``provenance.checkpoint_files``), each is there unchanged (a regular file, no symlink), and the
    folder holds nothing else. Otherwise (None, why not). A bare manifest beside a user's files
    proves nothing: only this record lets ``--force`` delete anything."""
    mp = folder / MANIFEST_NAME
    try:
        if not stat.S_ISREG(os.lstat(mp).st_mode):
            return None, f"no {MANIFEST_NAME}"
        d = json.loads(mp.read_text())
    except (OSError, ValueError):
        return None, f"no readable {MANIFEST_NAME}"
    if not isinstance(d, dict) or d.get("kind") not in KINDS or "heads" not in d:
        return None, f"its {MANIFEST_NAME} is not an edit manifest"
    listed = d.get("provenance", {}).get("checkpoint_files") if isinstance(d.get("provenance"), dict) else None
    if not isinstance(listed, dict) or not listed:
        return None, (f"its {MANIFEST_NAME} does not list the files the export wrote with their hashes (a manifest "
                      "alone is no proof; checkpoints exported before headsteer recorded them are not replaced)")
    root = folder.resolve()
    for rel, rec in listed.items():
        p = folder / rel
        if (not isinstance(rel, str) or not isinstance(rec, dict) or Path(rel).is_absolute() or ".." in Path(rel).parts
                or rel == MANIFEST_NAME):
            return None, f"its {MANIFEST_NAME} lists {rel!r}, which is not a file of the checkpoint"
        try:
            st = os.lstat(p)
        except OSError:
            return None, f"{rel}, which the export wrote, is missing"
        if not stat.S_ISREG(st.st_mode) or root not in p.resolve().parents:
            return None, f"{rel} is not the regular file the export wrote"
        if st.st_size != rec.get("size") or _sha256(p) != rec.get("sha256"):
            return None, f"{rel} was changed since the export wrote it"
    present = {q.relative_to(folder).as_posix() for q in folder.rglob("*") if not q.is_dir() or q.is_symlink()}
    extra = sorted(present - set(listed) - {MANIFEST_NAME})
    if extra:
        return None, f"it holds files the export did not write ({', '.join(extra[:5])})"
    return d, ""


def _own_checkpoint(folder: Path) -> dict | None:
    """The manifest of a checkpoint headsteer exported to ``folder`` and nobody changed since, or None."""
    return ownership(folder)[0]


def _remove_owned(folder: Path, manifest: dict) -> bool:
    """Delete the files ``manifest`` lists (and it), then the folders they leave empty; True when
    ``folder`` itself is gone. Anything else that appeared there stays."""
    for rel in [*manifest["provenance"]["checkpoint_files"], MANIFEST_NAME]:
        with contextlib.suppress(FileNotFoundError):
            (folder / rel).unlink()
    for d in sorted((q for q in folder.rglob("*") if q.is_dir() and not q.is_symlink()), key=lambda q: -len(q.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()
    try:
        folder.rmdir()
    except OSError:
        log.warning("%s: kept, it holds files headsteer did not write", folder)
        return False
    return True


def _clean_stale(out: Path):
    """Temporary folders of exports to ``out`` that were killed (their process is gone): a half-written
    new checkpoint is deleted; a replaced old one is put back if ``out`` is missing, else deleted.
    Only folders with headsteer's names and marks are touched, and of a replaced checkpoint only the
    files its record lists."""
    for d in out.parent.glob(glob.escape(f".{out.name}") + ".headsteer-*-*"):
        kind = _TMP if d.name.startswith(f".{out.name}{_TMP}") else _OLD if d.name.startswith(f".{out.name}{_OLD}") else None
        pid = d.name[len(f".{out.name}") + len(kind or ""):].split("-", 1)[0] if kind else ""
        if not kind or not pid.isdigit() or not d.is_dir() or d.is_symlink() or _pid_alive(int(pid)):
            continue
        if kind == _TMP and (d / _MARK).exists():
            shutil.rmtree(d, ignore_errors=True)
        elif (owned := _own_checkpoint(d)) is not None:
            if kind == _OLD and not out.exists():
                os.rename(d, out)  # the kill came between the two renames of a replacement
            else:
                _remove_owned(d, owned)


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
    if not (out / MANIFEST_NAME).exists():
        raise HeadsteerError(f"--out {out} is not empty and is not a checkpoint exported by headsteer (no "
                             f"{MANIFEST_NAME}): choose another --out (headsteer never deletes it, even with --force)")
    if not force:
        raise HeadsteerError(f"--out {out} holds an exported checkpoint: pass --force to replace it or choose another --out")
    owned, why = ownership(out)
    if owned is None:
        raise HeadsteerError(f"--out {out} is not (or no longer) exactly a checkpoint headsteer exported: {why}; "
                             "--force replaces only what headsteer wrote: move your files away or choose another --out")
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
    # apply_edit's refusals, before anything is written: a baked manifest kept no tensors (exporting it onto
    # these weights would drop the edit), heads out of range, other base weights
    manifest, ad = check_edit(model, manifest, processor, allow_other_model)
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
            shutil.copytree(adapter, tmp / "lora_adapter")  # file contents: a link would point outside the checkpoint
        saved = EditManifest(kind=manifest.kind, heads=manifest.heads, params=dict(manifest.params),
                             provenance=dict(manifest.provenance), baked=baked)
        if adapter is not None:
            saved.params["adapter_dir"] = "lora_adapter"
        if not baked and manifest.tensor_data:
            saved.with_tensors(manifest.tensor_data)
            saved.tensors = Path(MANIFEST_NAME).stem + ".tensors.safetensors"
        if saved.tensors:
            save_safetensors(saved.tensor_data, tmp / saved.tensors)
        # every file written, with its size and hash: the record that lets --force replace this folder later
        saved.provenance["checkpoint_files"] = file_record(tmp, skip={_MARK, MANIFEST_NAME})
        saved._tensors = None  # written above, listed in the record
        saved.save(tmp / MANIFEST_NAME)
        _umask_permissions(tmp)
        (tmp / _MARK).unlink()
        if replace:
            old_manifest, why = ownership(out)  # again: nothing may have appeared since the first check
            if old_manifest is None:
                raise HeadsteerError(f"--out {out} changed during the export: {why}; nothing was replaced")
            old = out.parent / f".{out.name}{_OLD}{os.getpid()}-{secrets.token_hex(3)}"
            os.rename(out, old)
            os.rename(tmp, out)
            _remove_owned(old, old_manifest)
        else:
            if out.exists():
                out.rmdir()  # an empty folder
            os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)) and not isinstance(e, HeadsteerError):
            why = " ".join(str(getattr(e, "strerror", None) or e).split())[:120]
            raise HeadsteerError(f"cannot write the checkpoint to {out}: {why} (disk full or a file-size limit?); nothing "
                                 "was written, and what was there is unchanged") from None
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
    """Load a checkpoint; an exported one's edit that is not in its weights is re-applied (installed),
    so the model answers as the export's edit says (any other checkpoint loads as ``headsteer.load``)."""
    # through the module: callers that replace headsteer.loading.load (a cache in tests) are honoured
    model, processor = headsteer.loading.load(path, allow_saved_edit=True, **load_kwargs)
    mp = headsteer.loading.resolve_model_path(path) / MANIFEST_NAME
    if mp.exists():
        manifest = EditManifest.load(mp)
        if not manifest.baked:
            install_edit(model, manifest, processor, allow_other_model=allow_other_model)
    return model, processor
