"""Interventions as data: what to do to which heads (``Spec``, ``Knockout``), and a Spec checked and
converted once for one model (``ActiveSpec``), which the session and the attention paths read. A Spec
is never modified, so one Spec can be reused."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .ablation import PATHS, Ablation
from .errors import HeadsteerError
from .heads import HeadSet


@dataclass(eq=False)
class Knockout:
    """Block attention from ``src`` keys to ``dst`` queries in the given heads.

    ``src``/``dst`` are group names (see ``Adapter.token_groups``) or bool [B, T] tensors;
    ``heads`` is a HeadSet/string, a bool [L, H] mask or one mask per example [B, L, H]
    (None = every head).
    """

    src: object
    dst: object
    heads: object = None


@dataclass(eq=False)
class Spec:
    """What to do to which heads. Every field is optional; an empty Spec changes nothing.
    ``intervene`` never modifies a Spec, so one Spec can be reused.

    - ``ablate``: bool [B|1, L, H] (or HeadSet/string); the selected heads' queries after the
      image read ``baseline`` keys/values at image positions (in a cross-attention family: every
      query of the selected cross-attention heads reads the baseline at every key).
    - ``baseline``: a ``headsteer.baseline.Baseline`` giving per-layer image K/V.
    - ``knockouts``: list of ``Knockout``.
    - ``image_attn``: float [L, H]; multiplies the attention probability that queries after the
      image put on image keys (then renormalised): 1 = unchanged, 0 = knockout, >1 amplify.
    - ``head_scale``: float [B|1, L, H] or [L, H] multiplying each head's output (input of ``o_proj``).
    - ``head_add``: float [L, H, head_dim] added to each head's output.
    - ``groups``: explicit position groups (else computed from ``input_ids``).
    - ``prefix``: a ``headsteer.fastpath.Prefix`` — the model is fed only the text suffix and
      reads the shared prefix K/V from it (the fast attribution engine).
    - ``fp32_attention``: run every text layer through headsteer's fp32-arithmetic attention
      even when nothing else is active (the precision policy; implied in bf16/fp16 by ablation,
      knockout, attention scaling and recording).
    - ``ablate_weight``: float [B|1, L, H] (may require grad): how far each head of ``ablate`` (every
      head when ``ablate`` is None) is ablated, 0 = clean, 1 = ablated, along ``interpolation``
      ("kv", "pattern" or "output": ``headsteer.ablation.interpolate``) — for gradient attribution.
    - ``grad_drop``: long [B], per batch row the language model's decoder layer (its own index)
      whose residual contribution passes no gradient backwards (-1: none); the forward is unchanged
      (GradDrop, Kramár et al. 2024).
    """

    ablate: object = None
    baseline: object = None
    knockouts: list = field(default_factory=list)
    image_attn: object = None
    head_scale: object = None
    head_add: object = None
    groups: dict | None = None
    prefix: object = None
    fp32_attention: bool = False
    ablate_weight: object = None
    interpolation: str = "output"
    grad_drop: object = None


@dataclass(frozen=True)
class ActiveSpec:
    """A Spec checked against one model, in the forms the attention paths read."""

    ablation: Ablation | None
    knockouts: tuple
    image_attn: torch.Tensor | None
    head_scale: torch.Tensor | None
    head_add: torch.Tensor | None
    groups: dict | None
    prefix: object
    fp32: bool
    grad_drop: torch.Tensor | None = None

    @property
    def attention_level(self) -> bool:
        return bool(self.ablation is not None or self.knockouts or self.image_attn is not None or self.prefix is not None
                    or self.fp32)

    @property
    def edits_attention(self) -> bool:
        """Knockout or image-attention scaling: they change the scores of every layer they name."""
        return bool(self.knockouts or self.image_attn is not None)


def _finite(t: torch.Tensor, name: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise HeadsteerError(f"{name} contains NaN or infinite values; give finite numbers")
    return t


def heads_mask(heads, ad, device) -> torch.Tensor:
    """bool [L, H] or [B, L, H] from a HeadSet, its text, a bool mask, or None (every head)."""
    if heads is None:
        return torch.ones(ad.num_layers, ad.num_heads, dtype=torch.bool, device=device)
    if isinstance(heads, (str, HeadSet)):
        return HeadSet.parse(heads, ad.num_layers, ad.num_heads).to_mask(ad.num_layers, ad.num_heads).to(device)
    m = torch.as_tensor(heads)
    if m.is_floating_point():
        raise HeadsteerError("head masks must be bool (True = selected); got a float tensor — compare it, e.g. masks > 0.5")
    m = m.bool().to(device)
    if m.ndim not in (2, 3) or m.shape[-2:] != (ad.num_layers, ad.num_heads):
        raise HeadsteerError(f"head mask has shape {tuple(m.shape)}; this model needs [..., {ad.num_layers}, {ad.num_heads}]")
    return m


def compile_spec(spec: Spec, ad) -> ActiveSpec:
    """Check ``spec`` against the model of ``ad`` (shapes, finite numbers, what its layout allows)."""
    L, H = ad.num_layers, ad.num_heads
    ablation = None
    if spec.ablate is not None or spec.ablate_weight is not None:
        if spec.baseline is None:
            raise HeadsteerError("ablation needs a baseline: Spec(baseline=...) from headsteer.baseline.make_baseline")
        m = heads_mask(spec.ablate, ad, "cpu")
        m = m if m.ndim == 3 else m[None]
        weight = None
        if spec.ablate_weight is not None:
            weight = _ablation_weight(spec, ad)
            m = m.expand(weight.shape[0], -1, -1) if m.shape[0] == 1 else m
        ablation = Ablation(m, spec.baseline, weight, spec.interpolation)
    image_attn = head_scale = head_add = None
    if spec.image_attn is not None:
        image_attn = _finite(torch.as_tensor(spec.image_attn, dtype=torch.float32), "image_attn")
        if image_attn.shape != (L, H):
            raise HeadsteerError(f"image_attn must be [{L}, {H}]; got {tuple(image_attn.shape)}")
        if bool((image_attn < 0).any()):
            raise HeadsteerError("image_attn factors must be >= 0 (0 = knock out, 1 = unchanged)")
    if spec.head_scale is not None:
        head_scale = _finite(torch.as_tensor(spec.head_scale, dtype=torch.float32), "head_scale")
        if head_scale.shape[-2:] != (L, H) or head_scale.ndim > 3:
            raise HeadsteerError(f"head_scale must be [{L}, {H}] or [B, {L}, {H}]; got {tuple(head_scale.shape)}")
    if spec.head_add is not None:
        head_add = _finite(torch.as_tensor(spec.head_add, dtype=torch.float32), "head_add")
        if head_add.shape != (L, H, ad.head_dim):
            raise HeadsteerError(f"head_add must be [{L}, {H}, {ad.head_dim}]; got {tuple(head_add.shape)}")
    for ko in spec.knockouts:
        if not isinstance(ko, Knockout):
            raise HeadsteerError(f"knockouts must be Knockout(src, dst, heads) values; got {type(ko).__name__}")
    if ad.cross_attention:
        if spec.knockouts or image_attn is not None:
            raise HeadsteerError(f"{ad.model_type} reads the image through cross-attention layers, whose every key is an image "
                                 "token: knockout and image-attention scaling are not defined there; use ablation or head scaling")
        if spec.prefix is not None:
            raise HeadsteerError(f"{ad.model_type} has no fast path (cross-attention layers): run the naive path (fast=False)")
    grad_drop = None
    if spec.grad_drop is not None:
        grad_drop = torch.as_tensor(spec.grad_drop).long().cpu()
        n = len(ad.language_model.layers)
        if grad_drop.ndim != 1 or bool(((grad_drop < -1) | (grad_drop >= n)).any()):
            raise HeadsteerError(f"grad_drop must be long [B] of decoder layer indices in [-1, {n}) (-1: none)")
    return ActiveSpec(ablation, tuple(spec.knockouts), image_attn, head_scale, head_add, spec.groups, spec.prefix,
                      bool(spec.fp32_attention), grad_drop)


def _ablation_weight(spec: Spec, ad) -> torch.Tensor:
    """The checked ``ablate_weight``: float [B|1, L, H], finite, kept as given (a tensor that requires grad
    stays the leaf the caller differentiates against)."""
    if spec.interpolation not in PATHS:
        raise HeadsteerError(f"unknown interpolation {spec.interpolation!r}: use one of {', '.join(PATHS)}")
    w = torch.as_tensor(spec.ablate_weight)
    if not w.is_floating_point():
        raise HeadsteerError("ablate_weight must be a float tensor [B|1, layers, heads] (0 = clean, 1 = ablated)")
    w = w if w.ndim == 3 else w[None]
    if w.ndim != 3 or tuple(w.shape[1:]) != (ad.num_layers, ad.num_heads):
        raise HeadsteerError(f"ablate_weight must be [B|1, {ad.num_layers}, {ad.num_heads}]; got {tuple(w.shape)}")
    _finite(w.detach(), "ablate_weight")
    return w
