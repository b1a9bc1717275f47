"""Reading what a user names: every path headsteer reads (images, data files, manifests, tensors,
model folders, run records) is checked here first. Only regular files (and folders where a folder
is asked for) are read: a named pipe would block the reader forever, a device (``/dev/zero``) never
ends, a socket cannot be read; a symlink loop is named as one rather than "No such file"."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import HeadsteerError

_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _stat(path: Path, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise HeadsteerError(f"{what} {path} is a symlink loop (a link that leads back to itself): fix or remove the "
                                 "link") from None
        if e.errno == errno.ENOENT:
            if os.path.islink(path):
                raise HeadsteerError(f"{what} {path} is a broken symlink (it points to {os.readlink(path)}, which does "
                                     "not exist)") from None
            raise HeadsteerError(f"{what} not found: {path}") from None
        if e.errno == errno.ENOTDIR:
            raise HeadsteerError(f"{what} not found: {path} (a part of the path is a file, not a folder)") from None
        if e.errno == errno.EACCES:
            raise HeadsteerError(f"{what} {path}: permission denied") from None
        if e.errno == errno.ENAMETOOLONG:
            raise HeadsteerError(f"{what} {str(path)[:80]}…: the name is too long for a path") from None
        raise HeadsteerError(f"{what} {path}: {e.strerror}") from None


def input_file(path, what: str = "file") -> Path:
    """``path`` if it is a regular file (after symlinks); else a one-line HeadsteerError saying what
    it is. Checked with ``os.stat``, which never blocks, before anything opens it."""
    p = Path(path)
    st = _stat(p, what)
    if stat.S_ISDIR(st.st_mode):
        raise HeadsteerError(f"{what} {p} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise HeadsteerError(f"{what} {p} is {_kind(st.st_mode)}, not a regular file: headsteer reads only regular "
                             "files (copy the content to a file)")
    return p


def input_dir(path, what: str = "folder") -> Path:
    """``path`` if it is a folder (after symlinks); else a one-line HeadsteerError."""
    p = Path(path)
    st = _stat(p, what)
    if not stat.S_ISDIR(st.st_mode):
        raise HeadsteerError(f"{what} {p} is {'a file' if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)}, not a folder")
    return p


def check_folder_entries(folder, what: str = "folder") -> None:
    """Every entry of ``folder`` (not recursive) is a regular file or a folder: a reader that lists
    the folder and opens what it finds (transformers' ``from_pretrained``) never meets a pipe, a
    device or a symlink loop."""
    folder = Path(folder)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise HeadsteerError(f"cannot list {what} {folder}: {e.strerror}") from None
    for e in entries:
        p = Path(e.path)
        st = _stat(p, f"{what} entry")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise HeadsteerError(f"{what} entry {p} is {_kind(st.st_mode)}, not a regular file: remove it from the folder")


def read_bytes(path, what: str = "file") -> bytes:
    """The bytes of a regular file. Opened without blocking and checked again on the open
    descriptor, so a file swapped for a pipe after the check cannot hang the read."""
    p = input_file(path, what)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise HeadsteerError(f"cannot read {what} {p}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise HeadsteerError(f"{what} {p} is {_kind(os.fstat(fd).st_mode)}, not a regular file")
        return f.read()


def read_text(path, what: str = "file") -> str:
    """A regular file's text as UTF-8 (a leading byte-order mark, as Excel and Notepad write it, is
    dropped); a file in another encoding is a one-line error naming the byte."""
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise HeadsteerError(f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}): save it as "
                             "UTF-8") from None
