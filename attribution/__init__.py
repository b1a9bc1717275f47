"""Head attribution: which heads carry image information into the answer."""
from __future__ import annotations

from headsteer.lazy import make_lazy

# Names resolve on first use: the CLI imports this package's command modules for
# `headsteer <command> --help`, which must not pay for torch and transformers.
_LAZY = {
    "report": None,
    "SuffixRunner": "engine",
    "ablated_logits": "engine",
    "naive_logits": "engine",
    "fit": "regression",
    "sample_masks": "regression",
    "statistic": "regression",
}

__all__ = ["ablated_logits", "naive_logits", "SuffixRunner", "fit", "sample_masks", "statistic", "report"]
make_lazy(__name__, _LAZY)
