"""Packages whose public names resolve on first use (PEP 562), so that ``import headsteer`` and the
CLI's ``--help`` do not pay for torch and transformers until something needs them."""
from __future__ import annotations

import importlib
import sys
import types


class LazyPackage(types.ModuleType):
    """``_lazy`` maps a public name to the submodule that defines it (None: the submodule of that
    name itself). The import system binds each imported submodule to the package attribute of its
    name; where a function has that name (``headsteer.load``, ``headsteer.edit.export``), the
    function keeps it."""

    _lazy: dict = {}

    def __getattr__(self, name):
        table = self.__dict__.get("_lazy", {})
        if name not in table:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        sub = importlib.import_module(f".{table[name] or name}", self.__name__)
        value = sub if table[name] is None else getattr(sub, name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and self.__dict__.get("_lazy", {}).get(name) == name:
            return
        super().__setattr__(name, value)


def make_lazy(module_name: str, table: dict) -> None:
    """Turn the package ``module_name`` into a LazyPackage resolving ``table``."""
    mod = sys.modules[module_name]
    mod.__dict__["_lazy"] = dict(table)
    mod.__class__ = LazyPackage
