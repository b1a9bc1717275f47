"""The one per-head intervention layer.

A custom attention function registered with ``transformers.AttentionInterface`` (it wraps the
model's own backend and falls through to it whenever a layer has nothing to do) plus a forward
pre-hook on each layer's output projection. ``with intervene(model, spec): ...`` switches the text
model to it and restores the model exactly on exit, also when the block (or entering it) raises.
Ablation, knockout, image-attention scaling, head scaling/steering, attention recording and the
fast path's shared prefix are all fields of one ``Spec``.

Per batch element and per *query* head: under grouped-query attention the shared KV head is only
replaced for the query heads that are selected.

Cross-attention families (``Adapter.cross_attention``: Llama 3.2 Vision) have no image positions in
the text: the layers headsteer acts on are the cross-attention layers, whose keys/values all come
from the image. Ablating such a head replaces all its keys/values by the baseline for every query
(every position is text); the model's cross-attention mask applies unchanged. Knockout and
image-attention scaling are not defined there (every key is an image token) and are refused.

Precision policy (every path): attention arithmetic (scores, softmax, weighted sum) in fp32, the
output cast back to the model's dtype. In bf16/fp16, once an attention-level intervention is
active every text layer runs this arithmetic, so the naive and the fast path share it.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .adapters import Adapter, get_adapter
from .attention_mask import NEG, additive_mask
from .errors import HeadsteerError
from .fastpath import prefixed_attention, seen_tokens
from .heads import HeadSet

_SESSION = "_headsteer_state"  # attribute of the model while a context is open
_LAYER = "_headsteer"  # attribute of each text attention module: (session, layer index)


# ----------------------------------------------------------------------------------------------
# Specs: interventions as data
# ----------------------------------------------------------------------------------------------
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


class Recorder:
    """Attention mass on image keys per (layer, head), summed over forwards. Sums stay on the
    model's device during the forward; ``mean``/``per_example`` bring them to the host.

    In a cross-attention family every key is an image token, so that mass is 1 by construction.
    There the recorder takes what each head writes into the residual stream instead: the norm
    ``|tanh(gate) * W_O[:, head] @ head output|`` at the query (norm-based attention analysis,
    Kobayashi et al. 2020) — a size in the residual stream's units, not a share."""

    def __init__(self, num_layers, num_heads):
        self.shape = (num_layers, num_heads)
        self._last: dict[int, torch.Tensor] = {}
        self._text: dict[int, torch.Tensor] = {}
        self.count = 0
        self._latest: dict[int, torch.Tensor] = {}  # layer -> [B, H] text->image mass of the last forward

    def per_example(self) -> torch.Tensor:
        """[B, L]: mean over heads of the after-image text's attention mass on image tokens, for
        each example of the most recent forward."""
        return torch.stack([self._latest[l].float().mean(-1) for l in sorted(self._latest)], 1).cpu()

    def add(self, layer, probs, img_k, after_q, last_q):
        self.add_mass(layer, (probs * img_k[:, None, None, :]).sum(-1), after_q, last_q)

    def add_mass(self, layer, mass, after_q, last_q):
        """``mass`` [B, H, q]: what each head gives each query (its attention mass on the image)."""
        lq, aq = last_q[:, None, :].float(), after_q[:, None, :].float()
        per_text = (mass * aq).sum(-1) / aq.sum(-1).clamp(min=1)  # [B, H]
        last = (mass * lq).sum(-1).sum(0).double()
        self._last[layer] = self._last[layer] + last if layer in self._last else last
        text = per_text.sum(0).double()
        self._text[layer] = self._text[layer] + text if layer in self._text else text
        self._latest[layer] = per_text.detach()
        if layer == 0:
            self.count += mass.shape[0]

    def mean(self, which="last") -> torch.Tensor:
        """float64 [L, H] on the host."""
        src = self._last if which == "last" else self._text
        out = torch.zeros(self.shape, dtype=torch.float64)
        for l, v in src.items():
            out[l] = v.cpu()
        return out / max(1, self.count)


# ----------------------------------------------------------------------------------------------
# A Spec checked and converted for one model (the user's Spec stays as given)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Active:
    ablate: torch.Tensor | None  # bool [B|1, L, H] on the host
    ablate_layers: frozenset
    baseline: object
    knockouts: tuple
    image_attn: torch.Tensor | None
    head_scale: torch.Tensor | None
    head_add: torch.Tensor | None
    groups: dict | None
    prefix: object
    fp32: bool

    @property
    def attention_level(self) -> bool:
        return bool(self.ablate_layers or self.knockouts or self.image_attn is not None or self.prefix is not None or self.fp32)


def _finite(t: torch.Tensor, name: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise HeadsteerError(f"{name} contains NaN or infinite values; give finite numbers")
    return t


def _compile(spec: Spec, ad: Adapter) -> _Active:
    L, H = ad.num_layers, ad.num_heads
    ablate, layers = None, frozenset()
    if spec.ablate is not None:
        if spec.baseline is None:
            raise HeadsteerError("ablation needs a baseline: Spec(baseline=...) from headsteer.baseline.make_baseline")
        m = _heads_mask(spec.ablate, ad, "cpu")
        ablate = m if m.ndim == 3 else m[None]
        layers = frozenset(int(l) for l in ablate.any(dim=(0, 2)).nonzero().flatten())
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
    return _Active(ablate, layers, spec.baseline, tuple(spec.knockouts), image_attn, head_scale, head_add, spec.groups,
                   spec.prefix, bool(spec.fp32_attention))


# ----------------------------------------------------------------------------------------------
# The per-model session: what is active while at least one context is open
# ----------------------------------------------------------------------------------------------
class _Session:
    def __init__(self, adapter: Adapter):
        self.ad = adapter
        self.actives: list[_Active] = []
        self.recorders: list[Recorder] = []
        self.object_patches: list = []
        self.captures: list[dict] = []
        self.groups: dict | None = None
        self.past = 0  # tokens seen before the current forward (set by the groups hook)
        self.kept_prefill: dict[int, int] = {}  # model layer -> prompt keys its cache always keeps (set there too)
        self.oproj_handles: list = []

    @property
    def recorder(self) -> Recorder | None:
        return self.recorders[-1] if self.recorders else None

    @property
    def capture(self) -> dict | None:
        return self.captures[-1] if self.captures else None

    def ablation(self) -> _Active | None:
        abl = [a for a in self.actives if a.ablate is not None]
        if len(abl) > 1:
            raise HeadsteerError("two active interventions both ablate heads; combine their masks into one Spec")
        return abl[0] if abl else None

    def prefix(self):
        pre = [a.prefix for a in self.actives if a.prefix is not None]
        if len(pre) > 1:
            raise HeadsteerError("two fast-path prefixes are active at once; run one SuffixRunner at a time")
        return pre[0] if pre else None

    def groups_for(self, active: _Active | None):
        g = active.groups if active is not None and active.groups is not None else self.groups
        if g is None:
            raise HeadsteerError("this intervention needs token positions: call the model with input_ids or give Spec(groups=...)")
        return g

    def layer_active(self, layer: int, dtype) -> bool:
        if self.recorder is not None:
            return True
        for a in self.actives:
            if a.knockouts or a.image_attn is not None or layer in a.ablate_layers:
                return True
        if dtype != torch.float32:  # the precision policy: one arithmetic for every layer
            return any(a.attention_level for a in self.actives)
        return False

    def needs_oproj_hooks(self) -> bool:
        return any(a.head_scale is not None or a.head_add is not None for a in self.actives)


def _pad_group(g: torch.Tensor, end: int, fill: bool) -> torch.Tensor:
    T = g.shape[1]
    if T >= end:
        return g[:, :end]
    return torch.cat([g, torch.full((g.shape[0], end - T), fill, dtype=torch.bool, device=g.device)], 1)


def _group(groups, name_or_mask, keys):
    """bool [B, k_len]: the group over the keys, ``keys`` = ``_key_positions``."""
    if isinstance(name_or_mask, str):
        if name_or_mask not in groups:
            raise HeadsteerError(f"unknown token group {name_or_mask!r}; known: {', '.join(sorted(groups))}")
        g = groups[name_or_mask]
        fill = name_or_mask in ("after_image", "sees_image", "text")  # generated tokens are text after the image
    else:
        g, fill = torch.as_tensor(name_or_mask), False
    pos, end = keys
    return _pad_group(g.to(pos.device).bool(), end, fill)[:, pos]


def _key_positions(session, q_len: int, k_len: int, layer_idx, device) -> tuple[torch.Tensor, int]:
    """(absolute positions of the keys, LongTensor [k_len]; one past the largest). The keys end with
    the current queries and are one run — from 0, except in a sliding-window layer whose cache has
    dropped the oldest ones — or, where the cache keeps every prompt key and a window of the latest
    generated ones (Unlimited-OCR's reference sliding window), the prompt then the latest keys."""
    end = session.past + q_len
    start = max(0, end - k_len)
    kept = session.kept_prefill.get(layer_idx, 0) if start > 0 else 0
    if not kept:
        return torch.arange(start, start + k_len, device=device), start + k_len
    g = session.groups
    if g is not None and not bool((g["text"] | g["image"])[:, :kept].all()):
        # seen on a tiny Unlimited-OCR: the padded row then differs from the same prompt alone, also
        # without headsteer, and its padding keys carry the image past an all-head ablation
        raise HeadsteerError("generation of a left-padded batch past the sliding window of a cache that keeps the prompt: "
                             "transformers 5.24's reference-sliding-window mask then shows the padding keys to the padded "
                             "rows; generate one prompt at a time (no padding)")
    return torch.cat([torch.arange(kept), torch.arange(end - (k_len - kept), end)]).to(device), end


def _heads_mask(heads, ad: Adapter, device) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------
def _base_fn(module, impl: str):
    if impl == "eager":
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return sdpa_attention_forward


def _make_attention(base: str):
    def headsteer_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        entry = getattr(module, _LAYER, None)
        if entry is not None:
            session, layer = entry
            if session.capture is not None:
                session.capture[layer] = (key.detach(), value.detach())
            prefix = session.prefix()
            if prefix is not None:
                return prefixed_attention(module, session, layer, prefix, query, key, value, attention_mask, scaling, kwargs)
            if session.layer_active(layer, query.dtype):
                attend = _attend_cross if session.ad.cross_attention else _attend
                return attend(module, session, layer, query, key, value, attention_mask, scaling, kwargs)
        return _base_fn(module, base)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    headsteer_attention.__name__ = f"headsteer_{base}"
    return headsteer_attention


for _base in ("sdpa", "eager"):
    AttentionInterface.register(f"headsteer_{_base}", _make_attention(_base))
    AttentionMaskInterface.register(f"headsteer_{_base}", sdpa_mask if _base == "sdpa" else eager_mask)


def _repeat(x, n):
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _scores(q, k, scaling, softcap):
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    return s if softcap is None else torch.tanh(s / softcap) * softcap


def _attend(module, session: _Session, layer, query, key, value, attention_mask, scaling, kwargs):
    ad = session.ad
    B, Hq, q_len, d = query.shape
    k_len = key.shape[2]
    dev = query.device
    scaling = scaling if scaling is not None else d ** -0.5
    n_rep = Hq // key.shape[1]
    softcap = kwargs.get("softcap")
    keys = _key_positions(session, q_len, k_len, getattr(module, "layer_idx", None), dev)
    k_e, v_e = _repeat(key, n_rep), _repeat(value, n_rep)
    mask = additive_mask(module, attention_mask, q_len, k_len, dev)
    bias = torch.zeros(1, 1, q_len, k_len, device=dev) if mask is None else mask
    groups = None
    for a in session.actives:
        if not (a.knockouts or a.image_attn is not None or a.ablate is not None):
            continue
        groups = session.groups_for(a)
        for ko in a.knockouts:
            hm = _heads_mask(ko.heads, ad, dev)[..., layer, :]  # [H] or per example [B, H]
            hm = hm[None] if hm.ndim == 1 else hm
            src = _group(groups, ko.src, keys)
            dst = _group(groups, ko.dst, keys)[:, k_len - q_len:]
            block = hm[:, :, None, None] & dst[:, None, :, None] & src[:, None, None, :]
            bias = bias.masked_fill(block, NEG)
        if a.image_attn is not None:
            fac = a.image_attn.to(dev)[layer]  # [H]
            img = _group(groups, "image", keys)
            aft = _group(groups, "after_image", keys)[:, k_len - q_len:]
            logf = torch.log(fac).clamp(min=NEG)
            add = logf[None, :, None, None] * (aft[:, None, :, None] & img[:, None, None, :])
            bias = bias + torch.nan_to_num(add, nan=0.0)
    probs = torch.softmax(_scores(query, k_e, scaling, softcap) + bias, dim=-1)
    out = torch.matmul(probs, v_e.float())
    if session.recorder is not None:
        g = groups if groups is not None else session.groups_for(None)
        img = _group(g, "image", keys)
        aft = _group(g, "after_image", keys)[:, k_len - q_len:]
        last = _group(g, "last", keys)[:, k_len - q_len:]
        session.recorder.add(layer, probs, img, aft, last)
    abl = session.ablation()
    if abl is not None and layer in abl.ablate_layers:
        am = abl.ablate[..., layer, :].to(dev)  # [B|1, H]
        groups = session.groups_for(abl)
        img = _group(groups, "image", keys)
        # every text query that sees the image: also tokens between image tiles or images
        aft = _group(groups, "sees_image", keys)[:, k_len - q_len:]
        # image ordinals by absolute position: a sliding-window cache may have dropped the first ones
        full = _pad_group(groups["image"].to(dev), keys[1], False)
        n_img = full.sum(1)
        if not bool((n_img == n_img[0]).all()):
            raise HeadsteerError(f"the rows of this batch have {n_img.tolist()} image positions; ablation with a baseline "
                                 "needs the same number in every row: use baseline='zero', or images of one size")
        ordinals = (full.long().cumsum(1) - 1)[:, keys[0]]
        kb, vb = abl.baseline.kv(layer, key, value, img, ordinals, int(n_img[0]))  # image positions replaced
        probs_b = torch.softmax(_scores(query, _repeat(kb, n_rep), scaling, softcap) + bias, dim=-1)
        out_b = torch.matmul(probs_b, _repeat(vb, n_rep).float())
        sel = am[:, :, None, None] & aft[:, None, :, None]
        out = torch.where(sel, out_b, out)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _attend_cross(module, session: _Session, layer, query, key, value, attention_mask, scaling, kwargs):
    """A cross-attention layer: keys/values [B, Hkv, n, d] are all image features, every query is
    text. An ablated query head reads the baseline at every key, for every query; rows that the
    model's cross-attention mask masks out keep the mask the model gives them (Mllama zeroes their
    mask, so they average the values: the baseline's, under ablation)."""
    ad = session.ad
    B, Hq, q_len, d = query.shape
    n, dev = key.shape[2], query.device
    if attention_mask is None:
        raise HeadsteerError(f"{ad.model_type}: its cross-attention layers got no cross-attention mask; pass the processor's "
                             "cross_attention_mask with the inputs")
    scaling = scaling if scaling is not None else d ** -0.5
    n_rep = Hq // key.shape[1]
    bias = additive_mask(module, attention_mask, q_len, n, dev)

    def attend(k, v):
        probs = torch.softmax(_scores(query, _repeat(k, n_rep), scaling, None) + bias, dim=-1)
        return torch.matmul(probs, _repeat(v, n_rep).float())

    out = attend(key, value)
    if session.recorder is not None:
        groups = session.groups_for(None)
        end = session.past + q_len
        queries = (torch.arange(session.past, end, device=dev), end)  # as _key_positions: the queries' positions
        after, last = _group(groups, "after_image", queries), _group(groups, "last", queries)
        session.recorder.add_mass(layer, _written_norm(ad, layer, out), after, last)
    abl = session.ablation()
    if abl is not None and layer in abl.ablate_layers:
        am = abl.ablate[..., layer, :].to(dev)  # [B|1, H]
        kb, vb = abl.baseline.image_kv(layer, n, key.dtype, dev)  # [Hkv, n, d]
        out = torch.where(am[:, :, None, None], attend(kb[None], vb[None]), out)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _written_norm(ad: Adapter, layer, out):
    """[B, H, q]: norm of what each head writes into the residual stream, tanh(gate) * W_O[:, h] @ out_h."""
    w = ad.out_proj(layer).weight.float()
    H, d = out.shape[1], out.shape[-1]
    gate = torch.tanh(ad.gates[layer].detach().to(out.device).float()).reshape(-1)  # one gate, or one per residual channel
    written = torch.einsum("bhqd,ehd->bhqe", out, w.view(w.shape[0], H, d)) * gate
    return written.norm(dim=-1)


# ----------------------------------------------------------------------------------------------
# o_proj input hook: per-head output scaling and steering
# ----------------------------------------------------------------------------------------------
def _oproj_hook(session: _Session, layer: int):
    def hook(mod, args):
        x = args[0]
        B, T, _ = x.shape
        H = session.ad.num_heads
        h = x.view(B, T, H, -1)
        for a in session.actives:
            if a.head_scale is not None:
                s = a.head_scale[..., layer, :].to(x.device, x.dtype)  # [H] or [B|1, H]
                h = h * (s.reshape(-1, 1, H, 1) if s.ndim == 2 else s[None, None, :, None])
            if a.head_add is not None:
                h = h + a.head_add[layer].to(x.device, x.dtype)[None, None]
        return (h.reshape(B, T, -1),) + tuple(args[1:])

    return hook


def _groups_hook(session: _Session):
    def hook(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        # Tokens seen before this forward: a sliding-window layer's cache keeps only the last
        # keys, and groups are aligned by absolute position (see _key_positions).
        session.past = seen_tokens(cache)
        # cache layers that keep the whole prompt besides their window (reference sliding window)
        session.kept_prefill = {i: n for i, lay in enumerate(getattr(cache, "layers", None) or [])
                                if isinstance(n := getattr(lay, "prefill_length", None), int)}
        if ids is None or (session.past > 0 and session.groups is not None):
            return None  # decoding: keep the prompt's groups; new tokens count as text after the image
        am = kwargs.get("attention_mask")
        patches = session.object_patches[-1] if session.object_patches else None
        session.groups = session.ad.token_groups(ids, am, patches)
        if session.ablation() is not None and _padded_before_text(am) and kwargs.get("position_ids") is None:
            # Positions count real tokens only, so that a padded row sees the same rotary phases
            # as the same prompt alone — and as the baseline's keys.
            pos = session.ad.padded_position_ids(am)
            if pos is not None:
                kwargs["position_ids"] = pos
                return args, kwargs
        return None

    return hook


def _padded_before_text(am) -> bool:
    """A pad before some real token: left padding, or the gap that the BLIP-2/InstructBLIP processors
    leave between the image tokens they prepend and the left-padded text."""
    if am is None or am.ndim != 2:
        return False
    real_later = am.flip(-1).cumsum(-1).flip(-1) > 0  # a real token at or after this position
    return bool(((am == 0) & real_later).any())


# ----------------------------------------------------------------------------------------------
# The handle: owns every hook, implementation name and attribute it sets, and undoes them
# ----------------------------------------------------------------------------------------------
class Intervention:
    """``with intervene(model, spec) as iv:`` — an open intervention on one model.

    Contexts nest: specs stack (scales multiply, additions add, knockouts accumulate). Leaving a
    context (normally or by an exception, also one raised while entering) undoes exactly what it
    did; the outermost one restores the model's attention implementation."""

    def __init__(self, model, spec: Spec, processor=None, object_patches=None, recorder=None, capture=None):
        self.model = model
        self.spec = spec
        self._ad = get_adapter(model, processor)
        self._active = _compile(spec, self._ad)
        self._extras = (object_patches, recorder, capture)
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "Intervention":
        if self._stack is not None:
            raise HeadsteerError("this intervention is already active; create a new one with intervene(...)")
        stack = contextlib.ExitStack()
        try:
            session = self.model.__dict__.get(_SESSION)
            if session is None:
                session = self._open_session(stack)
            _push(stack, session.actives, self._active)
            object_patches, recorder, capture = self._extras
            if object_patches is not None:
                _push(stack, session.object_patches, object_patches)
            if recorder is not None:
                _push(stack, session.recorders, recorder)
            if capture is not None:
                _push(stack, session.captures, capture)
            if session.needs_oproj_hooks() and not session.oproj_handles:
                stack.callback(_remove_hooks, session.oproj_handles)
                for i in range(self._ad.num_layers):
                    session.oproj_handles.append(self._ad.out_proj(i).register_forward_pre_hook(_oproj_hook(session, i)))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def _open_session(self, stack: contextlib.ExitStack) -> _Session:
        model, ad = self.model, self._ad
        session = _Session(ad)
        setattr(model, _SESSION, session)
        stack.callback(model.__dict__.pop, _SESSION, None)
        for cfg in {id(m.config): m.config for m in ad.attention}.values():
            impl = cfg._attn_implementation
            base = impl.removeprefix("headsteer_") if impl and impl.startswith("headsteer_") else impl
            stack.callback(setattr, cfg, "_attn_implementation_internal", impl)
            cfg._attn_implementation_internal = "headsteer_eager" if base == "eager" else "headsteer_sdpa"
        for i, m in enumerate(ad.attention):
            stack.callback(m.__dict__.pop, _LAYER, None)
            m.__dict__[_LAYER] = (session, i)
        stack.callback(model.register_forward_pre_hook(_groups_hook(session), with_kwargs=True).remove)
        return session

    def __exit__(self, *exc):
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        return False


def _push(stack, items: list, item):
    items.append(item)
    stack.callback(_remove_item, items, item)


def _remove_item(items: list, item):
    for i in range(len(items) - 1, -1, -1):
        if items[i] is item:
            del items[i]
            return


def _remove_hooks(handles: list):
    for h in handles:
        h.remove()
    handles.clear()


def is_intervened(model) -> bool:
    """True while an intervention (an edit applied as hooks, an ablation ...) is active on ``model``:
    its outputs then differ from what its weights alone say."""
    session = model.__dict__.get(_SESSION)
    return session is not None and bool(session.actives)


def intervene(model, spec: Spec | None = None, *, processor=None, object_patches=None, recorder: Recorder | None = None,
              capture: dict | None = None, **fields) -> Intervention:
    """``with intervene(model, Spec(...)): model(**inputs)`` — or pass the Spec fields as keywords.

    ``recorder`` collects attention mass on image keys; ``capture`` (a dict) receives each text
    layer's (key, value) after rotary embedding, by layer index."""
    if spec is not None and fields:
        raise HeadsteerError("give either a Spec or its fields as keywords, not both")
    return Intervention(model, spec if spec is not None else Spec(**fields), processor, object_patches, recorder, capture)
