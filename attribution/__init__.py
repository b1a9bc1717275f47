"""Head attribution: which heads carry image information into the answer."""
from __future__ import annotations

import importlib
import sys
import types

# Names resolve on first use (PEP 562): the CLI imports this package's command modules for
# `headsteer <command> --help`, which must not pay for torch and transformers.
_LAZY = {
    "report": None,
    "SuffixRunner": "engine",
    "ablated_logits": "engine",
    "naive_logits": "engine",
    "fit": "regression",
    "sample_masks": "regression",
    "statistic": "regression",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name) if _LAZY[name] else \
        importlib.import_module(f".{name}", __name__)
    globals()[name] = value
    return value


__all__ = ["ablated_logits", "naive_logits", "SuffixRunner", "fit", "sample_masks", "statistic", "report"]


class _Package(types.ModuleType):
    """The import system binds an imported submodule to the package attribute of its name; where
    that name belongs to a function of the same name (``export``, ``compare``), keep the function."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
