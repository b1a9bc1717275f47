"""Evaluation: VQA accuracy and cross-modal transfer, before and after edits; comparisons.

Names are imported on first use (PEP 562): the CLI imports this package's command modules for
`headsteer <command> --help`, which must not pay for torch and transformers (start-up time)."""
from __future__ import annotations

import importlib

_NAMES = {"bootstrap_ci": "accuracy", "normalize_answer": "accuracy", "soft_accuracy": "accuracy", "load_benchmark": "benchmarks",
          "load_pope": "benchmarks", "load_vqa": "benchmarks", "pope_metrics": "benchmarks", "compare": "comparison",
          "evaluate": "run", "summary": "run"}

__all__ = list(_NAMES)


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(f"module 'headsteer.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    globals()[name] = value
    return value
