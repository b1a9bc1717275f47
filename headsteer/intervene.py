"""The one per-head intervention layer.

A custom attention function registered with ``transformers.AttentionInterface`` (it wraps the
model's own backend and falls through to it whenever a layer has nothing to do) plus a forward
pre-hook on each layer's output projection. ``with intervene(model, spec): ...`` switches the text
model to it and restores the model exactly on exit. Ablation, knockout, image-attention scaling,
head scaling/steering and attention recording are all fields of one ``Spec``.

Per batch element and per *query* head: under grouped-query attention the shared KV head is only
replaced for the query heads that are selected.
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
from .errors import HeadsteerError
from .heads import HeadSet

NEG = -1e30  # finite, so a row whose every key is knocked out gives a uniform row instead of NaN


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

    - ``ablate``: bool [B|1, L, H] (or HeadSet); the selected heads' queries after the image read
      ``baseline`` keys/values at image positions.
    - ``baseline``: a ``Baseline`` (``attribution.baselines``) giving per-layer image K/V.
    - ``knockouts``: list of ``Knockout``.
    - ``image_attn``: float [L, H]; multiplies the attention probability that queries after the
      image put on image keys (then renormalised): 1 = unchanged, 0 = knockout, >1 amplify.
    - ``head_scale``: float [B|1, L, H] multiplying each head's output (input of ``o_proj``).
    - ``head_add``: float [L, H, head_dim] added to each head's output.
    - ``groups``: explicit position groups (else computed from ``input_ids``).
    - ``record``: collect each head's attention mass on image keys (from the last token and from
      all positions after the image) into ``Recorder``.
    """

    ablate: object = None
    baseline: object = None
    knockouts: list = field(default_factory=list)
    image_attn: torch.Tensor | None = None
    head_scale: torch.Tensor | None = None
    head_add: torch.Tensor | None = None
    groups: dict | None = None
    record: bool = False


class Recorder:
    """Attention mass on image keys per (layer, head), summed over forwards (see ``Spec.record``)."""

    def __init__(self, num_layers, num_heads):
        self.last = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.text = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.count = 0
        self.latest: dict[int, torch.Tensor] = {}  # layer -> [B, H] text->image mass of the last forward

    def per_example(self) -> torch.Tensor:
        """[B, L]: mean over heads of the after-image text's attention mass on image tokens, for
        each example of the most recent forward."""
        return torch.stack([self.latest[l].mean(-1) for l in sorted(self.latest)], 1)

    def add(self, layer, probs, img_k, after_q, last_q):
        img = probs.float() * img_k[:, None, None, :].float()  # [B,H,q,k]
        mass = img.sum(-1)  # [B,H,q]
        lq = last_q[:, None, :].float()
        aq = after_q[:, None, :].float()
        per_text = (mass * aq).sum(-1) / aq.sum(-1).clamp(min=1)  # [B, H]
        self.last[layer] += ((mass * lq).sum(-1)).sum(0).double().cpu()
        self.text[layer] += per_text.sum(0).double().cpu()
        self.latest[layer] = per_text.detach().float().cpu()
        if layer == 0:
            self.count += probs.shape[0]

    def mean(self, which="last"):
        return (self.last if which == "last" else self.text) / max(1, self.count)


# ----------------------------------------------------------------------------------------------
# Active state, keyed by attention module
# ----------------------------------------------------------------------------------------------
class _State:
    def __init__(self, adapter: Adapter):
        self.ad = adapter
        self.specs: list[Spec] = []
        self.groups: dict | None = None
        self.prefix = None  # fast engine: per-layer prefix K/V (see attribution.engine)
        self.recorder: Recorder | None = None
        self.capture: dict | None = None  # layer -> (key, value), filled when set (baselines)
        self.object_patches = None

    # combined view over the stacked specs
    def ablation(self):
        abl = [s for s in self.specs if s.ablate is not None]
        if len(abl) > 1:
            raise HeadsteerError("two active interventions both ablate heads; combine their masks into one Spec")
        return abl[0] if abl else None

    def groups_for(self, spec: Spec):
        g = spec.groups if spec.groups is not None else self.groups
        if g is None:
            raise HeadsteerError("this intervention needs token positions: call the model with input_ids or give Spec(groups=...)")
        return g


_ACTIVE: dict[int, tuple[_State, int]] = {}


def _pad_group(g: torch.Tensor, k_len: int, fill: bool) -> torch.Tensor:
    T = g.shape[1]
    if T >= k_len:
        return g[:, :k_len]
    return torch.cat([g, torch.full((g.shape[0], k_len - T), fill, dtype=torch.bool, device=g.device)], 1)


def _group(groups, name_or_mask, k_len, device):
    if isinstance(name_or_mask, str):
        if name_or_mask not in groups:
            raise HeadsteerError(f"unknown token group {name_or_mask!r}; known: {', '.join(sorted(groups))}")
        g = groups[name_or_mask]
        fill = name_or_mask in ("after_image", "text")  # generated tokens are text after the image
    else:
        g, fill = torch.as_tensor(name_or_mask), False
    return _pad_group(g.to(device).bool(), k_len, fill)


def _heads_mask(heads, ad: Adapter, device) -> torch.Tensor:
    if heads is None:
        return torch.ones(ad.num_layers, ad.num_heads, dtype=torch.bool, device=device)
    if isinstance(heads, (str, HeadSet)):
        return HeadSet.parse(heads, ad.num_layers, ad.num_heads).to_mask(ad.num_layers, ad.num_heads).to(device)
    m = torch.as_tensor(heads).bool().to(device)
    if m.shape[-2:] != (ad.num_layers, ad.num_heads):
        raise HeadsteerError(f"head mask has shape {tuple(m.shape)}; this model needs [..., {ad.num_layers}, {ad.num_heads}]")
    return m


def _base_fn(module, impl: str):
    if impl == "eager":
        mod = sys.modules[type(module).__module__]
        return getattr(mod, "eager_attention_forward")
    return sdpa_attention_forward


def _make_attention(base: str):
    def headsteer_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        entry = _ACTIVE.get(id(module))
        if entry is not None and entry[0].capture is not None:
            entry[0].capture[entry[1]] = (key.detach(), value.detach())
        if entry is None or not _layer_active(*entry):
            return _base_fn(module, base)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        state, layer = entry
        if state.prefix is not None:
            from .fastpath import prefixed_attention

            return prefixed_attention(module, state, layer, query, key, value, attention_mask, scaling, kwargs)
        return _attend(module, state, layer, query, key, value, attention_mask, scaling, kwargs)

    headsteer_attention.__name__ = f"headsteer_{base}"
    return headsteer_attention


def _layer_active(state: _State, layer: int) -> bool:
    if state.prefix is not None or state.recorder is not None:
        return True
    for s in state.specs:
        if s.knockouts or s.image_attn is not None:
            return True
        if s.ablate is not None and bool(s._ablate_t[..., layer, :].any()):
            return True
    return False


for _base in ("sdpa", "eager"):
    AttentionInterface.register(f"headsteer_{_base}", _make_attention(_base))
    AttentionMaskInterface.register(f"headsteer_{_base}", sdpa_mask if _base == "sdpa" else eager_mask)


def additive_mask(module, attention_mask, q_len, k_len, dtype, device):
    """The model's mask as an additive float [B|1, 1, q, k] (causal when the model skipped it)."""
    if attention_mask is None:
        if getattr(module, "is_causal", True) and q_len > 1:
            qi = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
            ki = torch.arange(k_len, device=device)[None, :]
            return torch.where(ki <= qi, 0.0, NEG).to(dtype)[None, None]
        return None
    m = attention_mask[:, :, :, :k_len]
    if m.dtype == torch.bool:
        return torch.where(m, 0.0, NEG).to(dtype)
    return m.to(dtype).clamp(min=NEG)


def _repeat(x, n):
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _scores(module, q, k, scaling, mask, softcap):
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return s if mask is None else s + mask


def _attend(module, state: _State, layer, query, key, value, attention_mask, scaling, kwargs):
    ad = state.ad
    B, Hq, q_len, d = query.shape
    k_len = key.shape[2]
    dev = query.device
    scaling = scaling if scaling is not None else d ** -0.5
    n_rep = Hq // key.shape[1]
    softcap = kwargs.get("softcap")
    k_e, v_e = _repeat(key, n_rep), _repeat(value, n_rep)
    mask = additive_mask(module, attention_mask, q_len, k_len, torch.float32, dev)
    bias = torch.zeros(B, Hq, q_len, k_len, device=dev) if mask is None else mask.expand(B, Hq, q_len, k_len).clone()
    groups = None
    for spec in state.specs:
        needs_groups = spec.knockouts or spec.image_attn is not None or spec.ablate is not None
        if not needs_groups and state.recorder is None:
            continue
        groups = state.groups_for(spec)
        for ko in spec.knockouts:
            hm = _heads_mask(ko.heads, ad, dev)[..., layer, :]  # [H] or per example [B, H]
            hm = hm[None] if hm.ndim == 1 else hm
            src = _group(groups, ko.src, k_len, dev)
            dst = _group(groups, ko.dst, k_len, dev)[:, k_len - q_len:]
            block = hm[:, :, None, None] & dst[:, None, :, None] & src[:, None, None, :]
            bias = bias.masked_fill(block, NEG)
        if spec.image_attn is not None:
            fac = spec.image_attn.to(dev)[layer].float()  # [H]
            img = _group(groups, "image", k_len, dev)
            aft = _group(groups, "after_image", k_len, dev)[:, k_len - q_len:]
            logf = torch.log(fac.clamp(min=0)).clamp(min=NEG)
            add = logf[None, :, None, None] * (aft[:, None, :, None] & img[:, None, None, :])
            bias = bias + torch.nan_to_num(add, nan=0.0)
    scores = _scores(module, query, k_e, scaling, None, softcap) + bias
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v_e.float())
    if state.recorder is not None:
        g = groups if groups is not None else state.groups_for(Spec())
        img = _group(g, "image", k_len, dev)
        aft = _group(g, "after_image", k_len, dev)[:, k_len - q_len:]
        last = _group(g, "last", k_len, dev)[:, k_len - q_len:]
        state.recorder.add(layer, probs, img, aft, last)
    abl = state.ablation()
    if abl is not None:
        am = abl._ablate_t[..., layer, :].to(dev)  # [B|1, H]
        if bool(am.any()):
            groups = state.groups_for(abl)
            img = _group(groups, "image", k_len, dev)
            aft = _group(groups, "after_image", k_len, dev)[:, k_len - q_len:]
            kb, vb = abl.baseline.kv(layer, key, value, img)  # key/value with image positions replaced
            kb_e, vb_e = _repeat(kb, n_rep), _repeat(vb, n_rep)
            probs_b = torch.softmax(_scores(module, query, kb_e, scaling, None, softcap) + bias, dim=-1)
            out_b = torch.matmul(probs_b, vb_e.float())
            sel = am[:, :, None, None] & aft[:, None, :, None]
            out = torch.where(sel, out_b, out)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


# ----------------------------------------------------------------------------------------------
# o_proj input hook: per-head output scaling and steering
# ----------------------------------------------------------------------------------------------
def _oproj_hook(state: _State, layer: int):
    def hook(mod, args):
        x = args[0]
        B, T, _ = x.shape
        h = x.view(B, T, state.ad.num_heads, -1)
        for spec in state.specs:
            if spec.head_scale is not None:
                s = spec.head_scale.to(x.device, x.dtype)
                s = s[..., layer, :] if s.ndim >= 2 else s
                h = h * (s.reshape(-1, 1, state.ad.num_heads, 1) if s.ndim == 2 else s[None, None, :, None])
            if spec.head_add is not None:
                h = h + spec.head_add[layer].to(x.device, x.dtype)[None, None]
        return (h.reshape(B, T, -1),) + tuple(args[1:])

    return hook


def _needs_hooks(state: _State) -> bool:
    return any(s.head_scale is not None or s.head_add is not None for s in state.specs)


# ----------------------------------------------------------------------------------------------
# The context manager
# ----------------------------------------------------------------------------------------------
def _prepare(spec: Spec, ad: Adapter) -> Spec:
    if spec.ablate is not None:
        if spec.baseline is None:
            raise HeadsteerError("ablation needs a baseline: Spec(baseline=...) from headsteer.attribution.make_baseline")
        m = _heads_mask(spec.ablate, ad, "cpu")
        spec._ablate_t = m if m.ndim == 3 else m[None]
    if spec.image_attn is not None:
        spec.image_attn = torch.as_tensor(spec.image_attn, dtype=torch.float32)
        if spec.image_attn.shape != (ad.num_layers, ad.num_heads):
            raise HeadsteerError(f"image_attn must be [{ad.num_layers}, {ad.num_heads}]")
    if spec.head_scale is not None:
        spec.head_scale = torch.as_tensor(spec.head_scale, dtype=torch.float32)
    if spec.head_add is not None:
        spec.head_add = torch.as_tensor(spec.head_add, dtype=torch.float32)
        if spec.head_add.shape != (ad.num_layers, ad.num_heads, ad.head_dim):
            raise HeadsteerError(f"head_add must be [{ad.num_layers}, {ad.num_heads}, {ad.head_dim}]")
    return spec


def _groups_hook(state: _State):
    def hook(mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        continuing = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
        if ids is None or (continuing and state.groups is not None):
            return None  # decoding: keep the prompt's groups; new tokens count as text after the image
        am = kwargs.get("attention_mask")
        state.groups = state.ad.token_groups(ids, am, state.object_patches)
        if (state.ablation() is not None and _left_padded(am) and kwargs.get("position_ids") is None
                and not state.ad.model_type.startswith("qwen")):
            # Positions count from the first real token (as generate() does), so that a padded row
            # sees the same rotary phases as the same prompt alone — and as the baseline's keys.
            kwargs["position_ids"] = (am.long().cumsum(-1) - 1).clamp(min=0)
            return args, kwargs
        return None

    return hook


def _left_padded(am) -> bool:
    return am is not None and am.ndim == 2 and bool((am[:, 0] == 0).any())


@contextlib.contextmanager
def intervene(model, spec: Spec | None = None, *, processor=None, object_patches=None, recorder: Recorder | None = None, **fields):
    """``with intervene(model, Spec(...)): model(**inputs)`` — or pass the Spec fields as keywords.

    Contexts nest: specs stack (scales multiply, additions add, knockouts accumulate).
    """
    ad = get_adapter(model, processor)
    spec = _prepare(spec if spec is not None else Spec(**fields), ad)
    root = getattr(model, "_headsteer_state", None)
    fresh = root is None
    if fresh:
        root = _State(ad)
        model._headsteer_state = root
    prev_rec, prev_obj = root.recorder, root.object_patches
    if object_patches is not None:
        root.object_patches = object_patches
    if recorder is not None:
        root.recorder = recorder
    root.specs.append(spec)
    saved, handles = [], []
    try:
        if fresh:
            for cfg in {id(m.config): m.config for m in ad.attention}.values():
                impl = cfg._attn_implementation
                base = impl.removeprefix("headsteer_") if impl and impl.startswith("headsteer_") else impl
                new = "headsteer_eager" if base == "eager" else "headsteer_sdpa"
                saved.append((cfg, impl))
                cfg._attn_implementation_internal = new
            for i, m in enumerate(ad.attention):
                _ACTIVE[id(m)] = (root, i)
            handles.append(model.register_forward_pre_hook(_groups_hook(root), with_kwargs=True))
            root._hook_handles = []
        if _needs_hooks(root) and not root._hook_handles:
            root._hook_handles = [ad.out_proj(i).register_forward_pre_hook(_oproj_hook(root, i)) for i in range(ad.num_layers)]
            added_hooks = True
        else:
            added_hooks = False
        yield spec
    finally:
        root.specs.remove(spec)
        root.recorder, root.object_patches = prev_rec, prev_obj
        if added_hooks:
            for h in root._hook_handles:
                h.remove()
            root._hook_handles = []
        if fresh:
            for h in handles:
                h.remove()
            for cfg, impl in saved:
                cfg._attn_implementation_internal = impl
            for m in ad.attention:
                _ACTIVE.pop(id(m), None)
            del model._headsteer_state
