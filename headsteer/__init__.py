"""headsteer: find the attention heads that carry image information into a VLM's answer, and
edit only those heads.

    >>> import headsteer
    >>> model, processor = headsteer.load("default")          # the embedded easy-VQA LLaVA, or a local checkpoint
    >>> str(headsteer.HeadSet.parse("L2H0-3,L3H5"))
    'L2H0-3,L3H5'

The public names below are imported on first use (PEP 562 ``__getattr__``): ``import headsteer`` — and
with it ``headsteer --help`` — must not pay for torch and transformers (start-up time). Edits live in
``headsteer.edit`` (``apply_edit``, ``export``, ``load_edited``), attribution in ``headsteer.attribution``
(``ablated_logits``, ``AblationRunner``), evaluation in ``headsteer.eval``."""
from __future__ import annotations

from .errors import HeadsteerError
from .exports import lazy_getattr

__version__ = "0.1.0"

# public name -> the module that defines it
_NAMES = {
    "HeadSet": "heads", "load": "loading", "default_model_path": "loading", "Adapter": "adapters", "get_adapter": "adapters",
    "supported_families": "families", "intervene": "intervention", "Spec": "intervention", "Knockout": "intervention",
    "Recorder": "intervention",
}

# submodules reachable as attributes (``headsteer.ask.default_image()``) without an import statement
_SUBMODULES = {"adapters", "ask", "baseline", "data", "fastpath", "heads", "intervention", "loading", "selfcheck", "toy"}

__all__ = ["HeadsteerError", *_NAMES]
__getattr__ = lazy_getattr(__name__, _NAMES, _SUBMODULES)
