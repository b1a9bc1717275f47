"""Public names imported on first use (PEP 562): ``import headsteer`` and the CLI's ``--help`` must not pay
for torch and transformers (start-up time). Each package's ``__init__`` maps its public names to the
modules that define them and takes its ``__getattr__`` from here."""
from __future__ import annotations

import importlib


def lazy_getattr(package: str, names: dict[str, str], submodules=()):
    """A module ``__getattr__`` for ``package``: ``names`` maps a public name to the submodule defining it;
    ``submodules`` are reachable as attributes without an import statement."""
    def __getattr__(name):
        if name in submodules:
            return importlib.import_module(f".{name}", package)
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{names[name]}", package), name)
        setattr(importlib.import_module(package), name, value)  # found once, then a plain attribute
        return value

    return __getattr__
