"""Head attribution: which heads carry image information into the answer.

    >>> import torch, headsteer
    >>> from headsteer.ask import default_image
    >>> from headsteer.attribution import ablated_logits
    >>> model, processor = headsteer.load("default")
    >>> masks = torch.rand(8, 4, 8) < 0.1                          # bool [M, layers, heads], True = ablated
    >>> ablated_logits(model, processor, default_image(), "what shape is in the image?", masks).shape[0]
    8

Names are imported on first use (PEP 562): the CLI imports this package's command modules for
`headsteer <command> --help`, which must not pay for torch and transformers (start-up time)."""
from __future__ import annotations

from headsteer.exports import lazy_getattr

_NAMES = {"AblationRunner": "engine", "ablated_logits": "engine", "naive_logits": "engine", "fit": "regression",
          "sample_masks": "regression", "statistic": "regression", "gradient_scores": "gradient"}

__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)
