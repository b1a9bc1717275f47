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


def head_slices(ad, heads, layer: int, proj: str, dim: int) -> torch.Tensor:
    """bool [dim]: the rows (q/k/v) or columns (o) of a projection of ``layer`` that belong to ``heads``
    (for k/v: to the KV heads their query heads read, which grouped-query attention shares)."""
    d = ad.head_dim
    keep = torch.zeros(dim, dtype=torch.bool)
    hs = heads.heads_in(layer)
    owners = hs if proj in ("q", "o") else sorted({h // ad.group_size() for h in hs})
    for h in owners:
        keep[h * d : (h + 1) * d] = True
    return keep


def lora_projections(ad, model, heads, targets="qkvo") -> dict[str, tuple[int, str]]:
    """module name -> (layer, projection) of the q/k/v/o projections a LoRA of ``heads`` may adapt."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for layer in heads.layers():
        for t in targets:
            lin = getattr(ad.attention[layer], f"{t}_proj", None)
            if lin is not None and id(lin) in names:
                out[names[id(lin)]] = (layer, t)
    return out


def lora_deltas(manifest: EditManifest, model, ad=None) -> dict[str, torch.Tensor]:
    """module name -> weight delta (scale * B @ A) of a LoRA edit. The tensors must be what the
    manifest says: only q/k/v/o projections of its heads' layers (of its ``targets``), with every
    row (q/k/v) or column (o) outside its heads exactly zero — a LoRA file reaching ``lm_head``, other
    layers or other heads is refused, not applied."""
    ad = ad or get_adapter(model)
    heads = manifest.headset(ad)
    t = manifest.tensor_data
    scale = float(manifest.params.get("scaling", 1.0) if manifest.params.get("scaling") is not None else 1.0)
    targets = manifest.params.get("targets") or list("qkvo")
    allowed = lora_projections(ad, model, heads, [x for x in "qkvo" if x in targets])
    bad_keys = [k for k in t if not (k.endswith(".lora_A") or k.endswith(".lora_B"))]
    if bad_keys:
        raise HeadsteerError(f"the LoRA edit holds tensors other than lora_A/lora_B ({bad_keys[0]}): remake the edit")
    names = sorted({k.rsplit(".lora_", 1)[0] for k in t})
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        if n not in mods:
            raise HeadsteerError(f"LoRA edit targets {n}, which this model does not have (was it made for another model?)")
        if n not in allowed:
            raise HeadsteerError(f"the LoRA edit of heads {manifest.heads} holds tensors for {n}, which is not a "
                                 f"{'/'.join(targets)} projection of those heads' layers: its tensors do not match its "
                                 "manifest; remake the edit")
        a, b = t.get(f"{n}.lora_A"), t.get(f"{n}.lora_B")
        w = getattr(mods[n], "weight", None)
        if a is None or b is None or w is None or a.ndim != 2 or b.ndim != 2 or (b.shape[0], a.shape[1]) != tuple(w.shape) \
                or b.shape[1] != a.shape[0]:
            raise HeadsteerError(f"the LoRA tensors for {n} are missing or do not fit its weight: remake the edit for this model")
        layer, proj = allowed[n]
        if proj == "o":
            keep = head_slices(ad, heads, layer, proj, a.shape[1])
            outside = a[:, ~keep]
        else:
            keep = head_slices(ad, heads, layer, proj, b.shape[0])
            outside = b[~keep]
        if outside.numel() and bool((outside != 0).any()):
            raise HeadsteerError(f"the LoRA tensors for {n} change heads outside {manifest.heads} (non-zero "
                                 f"{'columns' if proj == 'o' else 'rows'} of other heads): remake the edit")
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


def refuse_baked(manifest: EditManifest) -> None:
    """A baked manifest describes an edit already in its checkpoint's weights (and keeps no tensors):
    applied to a model it would apply nothing while saying it had."""
    if manifest.baked:
        where = getattr(manifest, "_source", None)
        ckpt = f" ({where.parent})" if where is not None else ""
        raise HeadsteerError(f"this manifest{ckpt} belongs to an exported checkpoint whose weights already carry the "
                             f"{manifest.kind} edit (baked): applying it to a model would apply nothing; load that "
                             "checkpoint itself as the model (--model DIR) to use the edit")


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
    manifest, ad = check_edit(model, manifest, processor, allow_other_model)
    with applied_checked(model, manifest, ad):
        yield manifest


def applied_checked(model, manifest: EditManifest, ad):
    """``apply_edit``'s context for a manifest and adapter ``check_edit`` returned: a caller that applies
    one edit many times (a run's self-check, then its main loop) checks it once — the base-weights check
    hashes every weight."""
    return kind_of(manifest.kind).applied(manifest, model, ad)


def check_edit(model, manifest: EditManifest | str, processor=None, allow_other_model: bool = False):
    """Every refusal ``apply_edit`` would make, without touching the model: callers that write a run
    folder check first, so a refused edit leaves no folder behind. Returns (manifest, adapter)."""
    if not isinstance(manifest, EditManifest):
        manifest = EditManifest.load(manifest)
    manifest.validate()  # the schema again: fields may have been changed since it was made or read
    refuse_baked(manifest)
    ad = get_adapter(model, processor)
    manifest.headset(ad)  # range check with a clear message
    manifest.check_base(model, allow_other_model=allow_other_model)  # made on these weights (or allowed)
    return manifest, ad


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
