"""Applying an edit manifest to a loaded model: as a ``with`` block (exact restore on exit) or
installed until ``remove_edit``."""
from __future__ import annotations

import contextlib

import torch

from headsteer.adapters import get_adapter
from headsteer.errors import HeadsteerError
from headsteer.intervene import Spec, intervene

from .manifest import EditManifest


def spec_for(manifest: EditManifest, ad) -> Spec:
    """The intervention Spec of a scale / attn / steer edit."""
    L, H = ad.num_layers, ad.num_heads
    mask = manifest.headset(ad).to_mask(L, H)
    p = manifest.params
    if manifest.kind == "scale":
        s = torch.ones(L, H)
        s[mask] = float(p.get("factor", 0.0))
        return Spec(head_scale=s)
    if manifest.kind == "attn":
        f = torch.ones(L, H)
        f[mask] = 1.0 + float(p.get("alpha", 0.0))
        return Spec(image_attn=f)
    if manifest.kind == "steer":
        vec = manifest.tensor_data.get("vectors")
        if vec is None:
            raise HeadsteerError("steer edit has no vectors: build it with `headsteer edit steer` or steering_vectors()")
        if tuple(vec.shape) != (L, H, ad.head_dim):
            raise HeadsteerError(f"steering vectors have shape {tuple(vec.shape)}; this model needs [{L}, {H}, {ad.head_dim}]")
        if not torch.isfinite(vec.float()).all():
            raise HeadsteerError("the steering vectors hold NaN or infinite values: remake the edit with `headsteer edit steer`")
        add = torch.zeros(L, H, ad.head_dim)
        add[mask] = float(p.get("strength", 1.0)) * vec[mask].float()
        return Spec(head_add=add)
    raise HeadsteerError(f"{manifest.kind} edits are weight edits, not interventions")


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
def _weights_added(model, deltas):
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
    ``allow_other_model`` (or the manifest's own ``allow_other_model``)."""
    if not isinstance(manifest, EditManifest):
        manifest = EditManifest.load(manifest)
    if allow_other_model:
        manifest.allow_other_model = True
    manifest.validate()  # the schema again: fields may have been changed since it was made or read
    ad = get_adapter(model, processor)
    manifest.headset(ad)  # range check with a clear message
    manifest.check_base(model)  # made on these weights (or allow_other_model)
    if manifest.baked:
        manifest.check_not_baked_on_base(model)  # a no-op on the unedited weights: refused, not silently ignored
        yield manifest
        return
    if manifest.kind == "lora":
        with _weights_added(model, lora_deltas(manifest, model)):
            yield manifest
    else:
        with intervene(model, spec_for(manifest, ad)):
            yield manifest


def install_edit(model, manifest, processor=None, allow_other_model: bool = False):
    """Keep an edit active (e.g. for ``generate`` in user code) until ``remove_edit(model)``."""
    stack = contextlib.ExitStack()
    stack.enter_context(apply_edit(model, manifest, processor, allow_other_model))
    model._headsteer_installed = getattr(model, "_headsteer_installed", []) + [stack]
    return model


def remove_edit(model):
    for stack in reversed(getattr(model, "_headsteer_installed", [])):
        stack.close()
    model._headsteer_installed = []
