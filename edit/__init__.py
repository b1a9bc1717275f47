"""Edit only the chosen heads: scale, image-attention scaling, steering, head-only LoRA; export."""
from __future__ import annotations

import importlib
import sys
import types

# Names resolve on first use (PEP 562): the CLI imports this package's command modules for
# `headsteer <command> --help`, which must not pay for torch and transformers.
_LAZY = {
    "apply_edit": "apply",
    "install_edit": "apply",
    "remove_edit": "apply",
    "spec_for": "apply",
    "export": "export",
    "load_edited": "export",
    "EditManifest": "manifest",
    "load_manifest": "manifest",
    "provenance": "manifest",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name) if _LAZY[name] else \
        importlib.import_module(f".{name}", __name__)
    globals()[name] = value
    return value


__all__ = ["EditManifest", "load_manifest", "provenance", "apply_edit", "install_edit", "remove_edit", "spec_for", "export", "load_edited"]


class _Package(types.ModuleType):
    """The import system binds an imported submodule to the package attribute of its name; where
    that name belongs to a function of the same name (``export``, ``compare``), keep the function."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
