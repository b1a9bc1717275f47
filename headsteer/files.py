"""Atomic output files: every file headsteer writes goes to a unique temporary name in the same
folder, is flushed to disk, then renamed over the final name — a reader (or a run killed midway)
sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's umask (read without changing it)."""
    # /proc avoids the set-and-restore of os.umask, which races with other threads creating files
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _fsync_dir(folder: Path):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside ``path``; when the block ends without error the file there is
    synced, given the permissions a plain ``open`` would give (``0o666 & ~umask`` — temporary
    files are created 0600) and renamed to ``path``. On error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_bytes(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + ("\n" if indent is not None else ""))


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> Path:
    """Tensors to a safetensors file, atomically. A failed write (disk full, a file-size limit) is an
    ``OSError`` naming the file, as for every other writer here (safetensors raises its own error
    type, which the CLI's error boundary would otherwise report as unexpected)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except SafetensorError as e:
            raise OSError(errno.EIO, " ".join(str(e).split())[:160], str(path)) from None
    return Path(path)


def save_figure(fig, path, dpi: int = 110) -> bytes:
    """Writes a matplotlib figure (format from the file's suffix) and returns its bytes."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    write_bytes(path, buf.getvalue())
    return buf.getvalue()


_umask = umask  # the old name
