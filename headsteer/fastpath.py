"""Fast path of the intervention layer: many head masks over one prompt's text suffix.

Ablation never changes the positions up to the last image token, so their keys/values are computed
once (batch 1) and every mask in a batch reads them by broadcasting — no copy per mask. A
``PrefixCache`` hands the model the prefix length (so positions, rotary phases and masks come out
as in a full forward) while each layer's ``update`` returns only the suffix keys/values; the
attention function below joins the two.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .errors import HeadsteerError


class _PrefixLayer(DynamicLayer):
    """Holds the batch-1 prefix K/V; ``update`` passes the suffix through without storing it."""

    def __init__(self, keys, values):
        super().__init__()
        self.keys, self.values = keys, values
        self.is_initialized = True
        self.device = keys.device

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int):
        return self.keys.shape[-2] + query_length, 0


class PrefixCache(DynamicCache):
    def __init__(self, cache: DynamicCache):
        super().__init__()
        self.layers = [_PrefixLayer(layer.keys, layer.values) for layer in cache.layers]

    def keys(self, layer):
        return self.layers[layer].keys

    def values(self, layer):
        return self.layers[layer].values


class Prefix:
    """What the attention function needs about the shared prefix."""

    def __init__(self, cache: PrefixCache, image_positions: torch.Tensor):
        self.cache = cache
        self.length = cache.layers[0].keys.shape[-2]
        idx = image_positions.nonzero().squeeze(-1)
        self.n_img = len(idx)
        contiguous = self.n_img > 0 and int(idx[-1] - idx[0]) + 1 == self.n_img
        self.img = slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx


def _rep(x, n):
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def prefixed_attention(module, state, layer, query, key, value, attention_mask, scaling, kwargs):
    """Attention of suffix queries [M, Hq, s, d] over the shared prefix and their own suffix."""
    from .intervene import additive_mask

    for spec in state.specs:
        if spec.knockouts or spec.image_attn is not None:
            raise HeadsteerError("the fast path evaluates head ablations only; use fast=False for knockouts or attention scaling")
    pre: Prefix = state.prefix
    M, Hq, s, d = query.shape
    n_rep = Hq // key.shape[1]
    scaling = scaling if scaling is not None else d ** -0.5
    softcap = kwargs.get("softcap")
    cdt = torch.float32 if query.dtype == torch.float32 else query.dtype
    pk = _rep(pre.cache.keys(layer), n_rep).to(cdt)  # [1, Hq, P, d], shared by every mask
    pv = _rep(pre.cache.values(layer), n_rep).to(cdt)
    sk, sv = _rep(key, n_rep).to(cdt), _rep(value, n_rep).to(cdt)
    q = query.to(cdt)
    P = pk.shape[2]
    scores = torch.cat([torch.matmul(q, pk.transpose(-1, -2)), torch.matmul(q, sk.transpose(-1, -2))], -1).float() * scaling
    abl = state.ablation()
    ab = None
    if abl is not None:
        am = abl._ablate_t[..., layer, :].to(query.device)  # [M|1, Hq]
        if bool(am.any()):
            ab = am.expand(M, Hq)[:, :, None, None]
            kb, vb = abl.baseline.image_kv(layer, pre.n_img, cdt, query.device)
            kb, vb = _rep(kb[None], n_rep), _rep(vb[None], n_rep)  # [1, Hq, n, d]
            sb = torch.matmul(q, kb.transpose(-1, -2)).float() * scaling
            scores[..., pre.img] = torch.where(ab, sb, scores[..., pre.img])
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = additive_mask(module, attention_mask, s, P + s, torch.float32, query.device)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1).to(cdt)
    pp = probs[..., :P]
    out = torch.matmul(pp, pv) + torch.matmul(probs[..., P:], sv)
    if ab is not None:
        delta = torch.matmul(pp[..., pre.img], vb - pv[:, :, pre.img])
        out = out + torch.where(ab, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    return out.to(query.dtype).transpose(1, 2).contiguous(), None
