"""Edit only the chosen heads: scale, image-attention scaling, steering, head-only LoRA; export."""
from .apply import apply_edit, install_edit, remove_edit, spec_for
from .export import export, load_edited
from .manifest import EditManifest, load_manifest, provenance

__all__ = ["EditManifest", "load_manifest", "provenance", "apply_edit", "install_edit", "remove_edit", "spec_for",
           "export", "load_edited"]
