"""What the subpackages register with the core: CLI commands and public functions, declared as
entry points in pyproject.toml (groups ``headsteer.commands`` and ``headsteer.api``). Through this
registry the core reaches them without importing a subpackage by name."""
from __future__ import annotations

from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points

from .errors import HeadsteerError


@lru_cache(maxsize=None)
def registered(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def api(name: str):
    """A function registered under ``headsteer.api`` (e.g. ``load_edited`` from headsteer.edit)."""
    ep = registered("headsteer.api").get(name)
    if ep is None:
        raise HeadsteerError(f"headsteer.{name} is not registered: reinstall headsteer (pip install -e .) so its entry points exist")
    return ep.load()
