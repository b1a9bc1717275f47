"""Imported first by every script: the scripts measure this checkout's code, so headsteer must be
installed from it (`pip install -e .`). Its subpackages sit beside headsteer/ (pyproject's
package-dir), so a sys.path entry cannot stand in for the install, and an install from another tree
would have the figures measure that tree's code."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def installed_from() -> Path | None:
    """The tree headsteer's subpackages are imported from, or None when it is not installed."""
    try:
        spec = importlib.util.find_spec("headsteer.attribution")
    except ModuleNotFoundError:
        return None
    return None if spec is None or spec.origin is None else Path(spec.origin).resolve().parents[1]


_where = installed_from()
if _where != ROOT:
    sys.exit(f"error: headsteer is {'not installed' if _where is None else f'installed from {_where}'}; these scripts "
             f"run this checkout's code: `pip install -e {ROOT}` first")
