"""Evaluation: VQA accuracy and cross-modal transfer, before and after edits; comparisons.

Names are imported on first use (PEP 562): the CLI imports this package's command modules for
`headsteer <command> --help`, which must not pay for torch and transformers (start-up time)."""
from __future__ import annotations

from headsteer.exports import lazy_getattr

_NAMES = {"bootstrap_ci": "accuracy", "normalize_answer": "accuracy", "soft_accuracy": "accuracy", "load_benchmark": "benchmarks",
          "load_pope": "benchmarks", "load_vqa": "benchmarks", "pope_metrics": "benchmarks", "compare": "comparison",
          "evaluate": "run", "summary": "run"}

__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)
