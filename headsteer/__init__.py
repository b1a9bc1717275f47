"""headsteer: find the attention heads that carry image information into a VLM's answer, and
edit only those heads."""
from .errors import HeadsteerError
from .heads import HeadSet
from .load import default_model_path, load
from .adapters import Adapter, get_adapter, supported_families
from .intervene import Knockout, Recorder, Spec, intervene
from . import ask  # noqa: F401  (exposes headsteer.ask.default_image)



def load_edited(path, **kwargs):
    """Load a checkpoint written by ``headsteer export`` (re-applying edits not baked into it)."""
    from .edit import load_edited as _load_edited

    return _load_edited(path, **kwargs)


__all__ = ["load_edited", 
    "HeadsteerError", "HeadSet", "load", "default_model_path", "Adapter", "get_adapter",
    "supported_families", "intervene", "Spec", "Knockout", "Recorder",
]
__version__ = "0.1.0"
