"""headsteer: find the attention heads that carry image information into a VLM's answer, and
edit only those heads.

Names are resolved on first use (PEP 562), so that ``import headsteer`` — and with it the CLI's
``--help`` — does not pay for torch and transformers until something needs them."""
from __future__ import annotations

import importlib
import sys
import types

from .errors import HeadsteerError

__version__ = "0.1.0"

_LAZY = {
    "HeadSet": "heads", "load": "load", "default_model_path": "load", "Adapter": "adapters", "get_adapter": "adapters",
    "supported_families": "adapters", "intervene": "intervene", "Spec": "intervene", "Knockout": "intervene",
    "Recorder": "intervene",
}
_SUBMODULES = {"adapters", "ask", "baseline", "data", "fastpath", "heads", "intervene", "load", "toy"}


def load_edited(path, **kwargs):
    """Load a checkpoint written by ``headsteer export``, re-applying edits not baked into its weights
    (registered by headsteer.edit; see headsteer/plugins.py)."""
    from .plugins import api

    return api("load_edited")(path, **kwargs)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'headsteer' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = ["HeadsteerError", "load_edited", *_LAZY]


class _Package(types.ModuleType):
    """The import system binds each imported submodule to the package attribute of its name; for
    ``load`` and ``intervene`` that name belongs to the function (``headsteer.load(...)``)."""

    def __setattr__(self, name, value):
        if name in ("load", "intervene") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
