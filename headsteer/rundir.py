"""A run folder has an identity: ``run.json`` holds everything that determines the numbers in it
(command, headsteer version, weights, processor, data rows, dtype, settings, edit, baseline) and
the hash of that. A run resumes only into a folder of the same identity; any other headsteer run
there is refused with one line naming what differs (``force`` starts over, deleting only the files
the old run listed as its own); a non-empty folder headsteer did not write is never touched."""
from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import headsteer

from .data import data_origin
from .errors import HeadsteerError
from .files import write_json
from .fingerprint import config_fingerprint, edit_fingerprint, processor_fingerprint, rows_fingerprint, weights_fingerprint
from .intervention import installed_labels
from .parallel import on_main_process
from .paths import read_text

RUN_FILE = "run.json"
FORMAT = "headsteer-run-1"
LOG_FILE = "headsteer.log"  # the log of every run in the folder (appended)

log = logging.getLogger("headsteer")
# resolved folder -> the lock file descriptor this process holds on it. Process-wide by nature: an OS lock
# belongs to the process (a second flock from the same process on a new descriptor would refuse itself).
_held: dict[str, int] = {}


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def data_identity(dataset, n: int | None = None) -> dict:
    """The rows a run reads: their count and content (exact, whatever loaded or transformed them),
    and where they came from when the loader recorded it (spec, split, question types) and nothing
    has transformed them since — so that a refusal can say "qtypes" rather than only "content"."""
    n = len(dataset) if n is None else min(n, len(dataset))
    return {**(data_origin(dataset) or {}), "rows": n, "content": rows_fingerprint(dataset, n)}


def run_identity(command: str, model=None, processor=None, dataset=None, n: int | None = None, data_spec=None,
                 settings: dict | None = None, edit=None, baseline=None) -> tuple[dict, dict]:
    """(identity, info): the identity is hashed; info is kept beside it for people (model path,
    time, ``data_spec`` — how the caller named the data, e.g. the --data text)."""
    ident = {"command": command, "headsteer": headsteer.__version__}
    info = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if model is not None:
        # an open intervention context changes the numbers in a way no fingerprint sees; an edit
        # installed by load_edited (or install_edit) is labelled with its fingerprint: recorded as installed_edit
        labels = installed_labels(model)
        if any(label is None for label in labels):
            raise HeadsteerError("an intervention or edit is active on the model, which a run folder cannot record: "
                                 "pass the edit as edit=..., or run without an output folder")
        p = next(model.parameters(), None)
        ident.update(weights=weights_fingerprint(model), config=config_fingerprint(model),
                     dtype=str(p.dtype).replace("torch.", "") if p is not None else None,
                     installed_edit=(labels[0] if len(labels) == 1 else labels) if labels else None)
        info["model"] = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", ""))
    if model is not None or processor is not None:
        ident["processor"] = processor_fingerprint(processor)
    if dataset is not None:
        ident["data"] = data_identity(dataset, n)
    if data_spec is not None:
        info["data"] = data_spec
    if settings is not None:
        ident["settings"] = settings
    ident["edit"] = edit_fingerprint(edit)
    if edit is not None and hasattr(edit, "describe"):
        info["edit"] = edit.describe()
    if baseline is not None:
        ident["baseline"] = baseline.describe() if hasattr(baseline, "describe") else str(baseline)
    return ident, info


@dataclass
class RunDir:
    path: Path
    identity: dict
    hash: str
    resumed: bool

    def __truediv__(self, name) -> Path:
        return self.path / name


def _read_record(folder: Path) -> dict | None:
    try:
        rec = json.loads(read_text(folder / RUN_FILE, "run record"))
    except (OSError, ValueError):  # HeadsteerError (a pipe, a loop ...) is a ValueError: not a run record
        return None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or "hash" not in rec:
        return None
    return rec


def _differences(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")] if old != new else []


def _inside(folder: Path, name: str) -> Path | None:
    target = (folder / name).resolve()
    root = folder.resolve()
    return target if target != root and root in target.parents else None


def _consistent(rec: dict) -> bool:
    """True for a run.json as ``open_run`` writes it: its hash is the hash of its identity."""
    return isinstance(rec.get("identity"), dict) and rec.get("hash") == identity_hash(rec["identity"])


def _remove_written(folder: Path, rec: dict, allowed=None):
    """Delete what the run recorded as its own (recursing into sub-runs), its temporary files, and
    its run.json; anything else in the folder stays. ``allowed``: the names the command replacing it
    writes — a record is a file anyone can write, so only those names are deleted even when it lists
    others (a run.json copied or written beside a user's files cannot make --force delete them)."""
    for name in rec.get("written", []):
        if allowed is not None and name not in allowed:
            continue
        target = _inside(folder, name)
        if target is None:
            continue
        if target.is_dir() and not target.is_symlink():
            sub = _read_record(target)
            if sub is not None:
                _remove_written(target, sub)
            for d in [target, *target.parents]:  # folders headsteer made for it, once empty
                if d == folder.resolve() or not d.is_dir() or any(d.iterdir()):
                    break
                d.rmdir()
        elif target.exists() or target.is_symlink():
            target.unlink()
        for tmp in target.parent.glob(f".{target.name}.*.tmp"):
            tmp.unlink(missing_ok=True)
    (folder / RUN_FILE).unlink(missing_ok=True)


def _lock(folder: Path):
    """One process per run folder: a second one (another terminal, a second job) gets a one-line
    refusal instead of interleaving its rows with the first's. The lock is an flock on the folder
    itself (no file is added); it lives as long as the process (the operating system releases it
    when the process ends, also when killed)."""
    key = str(folder.resolve())
    if key in _held:
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise HeadsteerError(f"{folder} is in use by another headsteer process: wait for it to finish or choose "
                             "another --out") from None
    _held[key] = fd


def _log_to(folder: Path):
    """Append this process's headsteer log to the folder's headsteer.log (and no longer to the
    logs of earlier runs of the process, unless they are folders above this one)."""
    path = str((folder / LOG_FILE).resolve())
    keep = False
    for hd in list(log.handlers):
        if not isinstance(hd, logging.FileHandler) or not getattr(hd, "_headsteer_run", False):
            continue
        if hd.baseFilename == path and os.path.exists(path):
            keep = True
        elif hd.baseFilename == path or Path(hd.baseFilename).parent not in Path(path).parents:
            log.removeHandler(hd)
            hd.close()
    if keep:
        return
    hd = logging.FileHandler(path, encoding="utf-8")
    hd._headsteer_run = True
    hd.setLevel(logging.DEBUG)
    hd.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(hd)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)


def _check_writable(folder: Path):
    for d in [folder, *folder.parents]:
        if d.exists():
            if not d.is_dir():
                raise HeadsteerError(f"--out {folder}: {d} is a file, not a folder; choose another --out")
            if not os.access(d, os.W_OK | os.X_OK):
                raise HeadsteerError(f"--out {folder}: {d} is not writable; choose another --out")
            return


def check_out(path) -> Path:
    """Refuse, before any work, an --out that can never hold a run: a file, a folder that cannot be
    written, a non-empty folder headsteer did not write. (Another run's folder is judged by
    ``open_run``, which knows the identity.)"""
    folder = Path(path)
    _check_writable(folder)
    if folder.exists() and any(folder.iterdir()) and _read_record(folder) is None:
        raise HeadsteerError(f"{folder} is not empty and has no {RUN_FILE}: not written by headsteer (or by a version "
                             "before run identities); choose another --out (headsteer deletes nothing there, even "
                             "with --force)")
    return folder


def _open(folder: Path, identity: dict, h: str, force: bool, outputs: list[str], info: dict) -> bool:
    check_out(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HeadsteerError(f"cannot create --out {folder}: {e.strerror}; choose another --out") from None
    _lock(folder)
    outputs = [*outputs, LOG_FILE]
    if any(folder.iterdir()):
        rec = _read_record(folder)
        if rec is None:
            raise HeadsteerError(f"{folder} is not empty and has no {RUN_FILE}: not written by headsteer (or by a version "
                                 "before run identities); choose another --out (headsteer deletes nothing there, even "
                                 "with --force)")
        if rec["hash"] == h and not force:
            written = sorted(set(rec.get("written", [])) | set(outputs))
            if written != rec.get("written"):
                write_json(folder / RUN_FILE, {**rec, "written": written})
            return True
        if not force:
            old = rec.get("identity", {})
            if old.get("command") != identity.get("command"):
                what = f"command: it is a `headsteer {old.get('command')}` run"
            else:
                diff = _differences(old, identity)
                what = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "") or "identity"
            raise HeadsteerError(f"{folder} holds a run with other settings (differs in: {what}); pass --force to start "
                                 "over or choose another --out")
        # a record whose hash is not its identity's was not written by open_run: it may list any file,
        # so only the names this run writes itself are deleted
        _remove_written(folder, rec, allowed=None if _consistent(rec) else set(outputs))
    write_json(folder / RUN_FILE, {"format": FORMAT, "identity": identity, "hash": h, "info": info,
                                   "written": sorted(set(outputs))})
    return False


def record(run: RunDir, key: str, value) -> None:
    """Keep ``value`` under ``key`` in the folder's run.json, beside its identity (figures the run
    measured about itself, e.g. its self-check: not part of the identity, so a resume replaces them)."""
    def write():
        rec = _read_record(run.path)
        if rec is not None:
            write_json(run.path / RUN_FILE, {**rec, key: value})

    on_main_process(write)


def open_run(path, identity: dict, *, force: bool = False, outputs=(), info: dict | None = None) -> RunDir:
    """Create, resume or refuse the run folder ``path`` for ``identity``. ``outputs``: the file
    (or sub-run folder) names this run may write there, relative to it — what ``force`` may
    delete later. Under ``accelerate launch`` rank 0 decides and writes; every rank gets its
    answer (or its one-line refusal)."""
    folder = Path(path)
    h = identity_hash(identity)
    resumed = on_main_process(lambda: _open(folder, identity, h, force, list(outputs), info or {}))
    if on_main_process(lambda: True):
        _log_to(folder)
        log.info("%s run %s in %s (identity %s; %s)", identity.get("command"), "resumed" if resumed else "started", folder,
                 h[:12], ", ".join(f"{k}={v}" for k, v in info.items()) if info else "")
    return RunDir(folder, identity, h, resumed)

