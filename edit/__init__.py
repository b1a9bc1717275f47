"""Edit only the chosen heads: scale, image-attention scaling, steering, head-only LoRA; export.

    >>> import headsteer
    >>> from headsteer.edit import EditManifest, apply_edit
    >>> model, processor = headsteer.load("default")
    >>> edit = EditManifest("scale", "L2H0-3", {"factor": 0.0})
    >>> with apply_edit(model, edit, processor):                 # exact restore on exit
    ...     pass

Names are imported on first use (PEP 562): the CLI imports this package's command modules for
`headsteer <command> --help`, which must not pay for torch and transformers (start-up time)."""
from __future__ import annotations

from headsteer.exports import lazy_getattr

_NAMES = {"apply_edit": "apply", "install_edit": "apply", "remove_edit": "apply", "spec_for": "apply", "export": "checkpoint",
          "load_edited": "checkpoint", "EditManifest": "manifest", "load_manifest": "manifest", "provenance": "manifest",
          "KINDS": "kinds"}

__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)
