"""Applying an edit manifest to a loaded model: as a ``with`` block (exact restore on exit) or
installed until ``remove_edit``."""
from __future__ import annotations

import contextlib
import weakref

import torch

from headsteer.adapters import get_adapter
from headsteer.errors import HeadsteerError

from .kinds import kind_of
from .manifest import EditManifest


def spec_for(manifest: EditManifest, ad):
    """The intervention Spec of an edit applied as one (scale, attn, steer); an error for a weight edit."""
    spec = kind_of(manifest.kind).spec(manifest, ad)
    if spec is None:
        raise HeadsteerError(f"{manifest.kind} edits are weight edits, not interventions")
    return spec


def lora_deltas(manifest: EditManifest, model) -> dict[str, torch.Tensor]:
    """module name -> weight delta (scale * B @ A) of a LoRA edit."""
    t = manifest.tensor_data
    scale = float(manifest.params.get("scaling", 1.0))
    names = sorted({k.rsplit(".lora_", 1)[0] for k in t})
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        if n not in mods:
            raise HeadsteerError(f"LoRA edit targets {n}, which this model does not have (was it made for another model?)")
        a, b = t.get(f"{n}.lora_A"), t.get(f"{n}.lora_B")
        w = getattr(mods[n], "weight", None)
        if a is None or b is None or w is None or a.ndim != 2 or b.ndim != 2 or (b.shape[0], a.shape[1]) != tuple(w.shape) \
                or b.shape[1] != a.shape[0]:
            raise HeadsteerError(f"the LoRA tensors for {n} are missing or do not fit its weight: remake the edit for this model")
        d = scale * (b.float() @ a.float())
        if not torch.isfinite(d).all():
            raise HeadsteerError(f"the LoRA tensors for {n} hold NaN or infinite values: remake the edit")
        out[n] = d
    return out


@contextlib.contextmanager
def weights_added(model, deltas):
    """The model with ``deltas`` (module name -> weight delta) added to those modules' weights; restored on exit."""
    mods = dict(model.named_modules())
    saved = {}
    try:
        with torch.no_grad():
            for n, d in deltas.items():
                w = mods[n].weight
                saved[n] = w.detach().clone()
                w.add_(d.to(w.device, w.dtype))
        yield
    finally:
        with torch.no_grad():
            for n, w0 in saved.items():
                mods[n].weight.copy_(w0)


@contextlib.contextmanager
def apply_edit(model, manifest: EditManifest | str, processor=None, allow_other_model: bool = False):
    """``with apply_edit(model, "edit.json"): model(...)`` — the model is exactly restored on exit.
    An edit made on other weights (its ``provenance.base_hash``) is refused unless
    ``allow_other_model``. The manifest you pass is not modified.

    >>> import headsteer
    >>> from headsteer.edit import EditManifest
    >>> model, processor = headsteer.load("default")
    >>> with apply_edit(model, EditManifest("scale", "L2H0-3", {"factor": 0.0}), processor):
    ...     pass  # model(...) here runs with heads 0-3 of layer 2 silenced
    """
    if not isinstance(manifest, EditManifest):
        manifest = EditManifest.load(manifest)
    manifest.validate()  # the schema again: fields may have been changed since it was made or read
    ad = get_adapter(model, processor)
    manifest.headset(ad)  # range check with a clear message
    manifest.check_base(model, allow_other_model=allow_other_model)  # made on these weights (or allowed)
    if manifest.baked:
        manifest.check_not_baked_on_base(model)  # a no-op on the unedited weights: refused, not silently ignored
        yield manifest
        return
    with kind_of(manifest.kind).applied(manifest, model, ad):
        yield manifest


# model -> the edits installed on it (install_edit), each an open context; weak, so it goes with the model
_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def install_edit(model, manifest, processor=None, allow_other_model: bool = False):
    """Keep an edit active (e.g. for ``generate`` in user code) until ``remove_edit(model)``."""
    stack = contextlib.ExitStack()
    stack.enter_context(apply_edit(model, manifest, processor, allow_other_model))
    _INSTALLED.setdefault(model, []).append(stack)
    return model


def remove_edit(model):
    """Undo every edit ``install_edit`` installed on ``model``, the last first."""
    for stack in reversed(_INSTALLED.pop(model, [])):
        stack.close()
