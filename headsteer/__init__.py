"""headsteer: find the attention heads that carry image information into a VLM's answer, and
edit only those heads.

Names are resolved on first use (PEP 562), so that ``import headsteer`` — and with it the CLI's
``--help`` — does not pay for torch and transformers until something needs them."""
from __future__ import annotations

from .errors import HeadsteerError
from .lazy import make_lazy
from .plugins import api

__version__ = "0.1.0"

_LAZY = {
    "HeadSet": "heads", "load": "load", "default_model_path": "load", "Adapter": "adapters", "get_adapter": "adapters",
    "supported_families": "families", "intervene": "intervene", "Spec": "intervene", "Knockout": "intervene",
    "Recorder": "intervene",
}
_SUBMODULES = {"adapters", "ask", "baseline", "data", "fastpath", "heads", "intervene", "load", "toy"}  # import headsteer.X


def load_edited(path, **kwargs):
    """Load a checkpoint written by ``headsteer export``, re-applying edits not baked into its weights
    (registered by headsteer.edit; see headsteer/plugins.py)."""
    return api("load_edited")(path, **kwargs)


__all__ = ["HeadsteerError", "load_edited", *_LAZY]


make_lazy(__name__, {**{m: None for m in _SUBMODULES}, **_LAZY})  # a function keeps its module's name (load, intervene)
