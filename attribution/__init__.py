"""Head attribution: which heads carry image information into the answer."""
from .engine import SuffixRunner, ablated_logits, naive_logits

__all__ = ["ablated_logits", "naive_logits", "SuffixRunner"]
