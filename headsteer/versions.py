"""The transformers versions headsteer was tested on: the range pyproject.toml declares (read back from
the installed package's metadata, so there is one place to change it), and the one-line warning a user
outside it gets when a model is first adapted."""
from __future__ import annotations

import functools
import logging
from importlib.metadata import PackageNotFoundError, requires

import transformers
from packaging.requirements import Requirement
from packaging.version import Version

log = logging.getLogger("headsteer")


@functools.lru_cache(maxsize=None)
def tested_range(package: str = "transformers"):
    """The SpecifierSet headsteer's metadata declares for ``package`` (None: not installed as a package)."""
    try:
        reqs = requires("headsteer") or []
    except PackageNotFoundError:
        return None
    for r in reqs:
        req = Requirement(r)
        if req.name == package and req.marker is None:
            return req.specifier
    return None


def range_text(spec) -> str:
    """``>=5.24,<5.26``: lower bounds first (a SpecifierSet prints in no fixed order)."""
    return ",".join(sorted(map(str, spec), key=lambda s: (not s.startswith(">"), s)))


def untested_transformers(version: str | None = None) -> str | None:
    """A one-line warning when ``version`` (default: the installed transformers) is outside the tested
    range, else None."""
    spec = tested_range()
    version = version or transformers.__version__
    if spec is None or not str(spec) or Version(version) in spec:
        return None
    text = range_text(spec)
    return (f"transformers {version} is outside the range headsteer was tested on ({text}): every run checks its own "
            f"engine and stops or falls back where it fails, but expect refusals; pip install 'transformers{text}'")


@functools.lru_cache(maxsize=1)
def warn_untested_transformers() -> None:
    """Warn once per process (see ``untested_transformers``)."""
    msg = untested_transformers()
    if msg is not None:
        log.warning(msg)
