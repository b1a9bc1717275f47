"""Evaluation: VQA accuracy and cross-modal transfer, before and after edits; comparisons."""
from __future__ import annotations

from headsteer.lazy import make_lazy

# Names resolve on first use: the CLI imports this package's command modules for
# `headsteer <command> --help`, which must not pay for torch and transformers.
_LAZY = {
    "bootstrap_ci": "accuracy",
    "normalize_answer": "accuracy",
    "soft_accuracy": "accuracy",
    "load_benchmark": "benchmarks",
    "load_pope": "benchmarks",
    "load_vqa": "benchmarks",
    "pope_metrics": "benchmarks",
    "compare": "compare",
    "evaluate": "run",
    "summary": "run",
}

__all__ = ["evaluate", "summary", "compare", "normalize_answer", "soft_accuracy", "bootstrap_ci", "load_benchmark", "load_pope", "load_vqa", "pope_metrics"]
make_lazy(__name__, _LAZY)
