"""Head attribution: which heads carry image information into the answer."""
from . import report
from .engine import SuffixRunner, ablated_logits, naive_logits
from .regression import fit, sample_masks, statistic

__all__ = ["ablated_logits", "naive_logits", "SuffixRunner", "fit", "sample_masks", "statistic", "report"]
