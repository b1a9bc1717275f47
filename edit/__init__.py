"""Edit only the chosen heads: scale, image-attention scaling, steering, head-only LoRA; export."""
from __future__ import annotations

from headsteer.lazy import make_lazy

# Names resolve on first use: the CLI imports this package's command modules for
# `headsteer <command> --help`, which must not pay for torch and transformers.
_LAZY = {
    "apply_edit": "apply",
    "install_edit": "apply",
    "remove_edit": "apply",
    "spec_for": "apply",
    "export": "export",
    "load_edited": "export",
    "EditManifest": "manifest",
    "load_manifest": "manifest",
    "provenance": "manifest",
}

__all__ = ["EditManifest", "load_manifest", "provenance", "apply_edit", "install_edit", "remove_edit", "spec_for", "export", "load_edited"]
make_lazy(__name__, _LAZY)
