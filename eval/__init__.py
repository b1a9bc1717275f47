"""Evaluation: VQA accuracy and cross-modal transfer, before and after edits; comparisons."""
from .accuracy import bootstrap_ci, normalize_answer, soft_accuracy
from .benchmarks import load_benchmark, load_pope, load_vqa, pope_metrics
from .compare import compare
from .run import evaluate, summary

__all__ = ["evaluate", "summary", "compare", "normalize_answer", "soft_accuracy", "bootstrap_ci", "load_benchmark",
           "load_pope", "load_vqa", "pope_metrics"]
