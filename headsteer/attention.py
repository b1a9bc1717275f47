"""The attention arithmetic of the intervention layer: one attention function registered with
transformers' ``AttentionInterface`` (and the matching ``AttentionMaskInterface`` entry), which wraps
the model's own backend and falls through to it whenever a layer has nothing to do.

A layer with something to do runs headsteer's own arithmetic — scores, softmax and the weighted sum in
fp32 on the model's inputs, the output cast back (the precision policy of every path): knockout and
image-attention scaling as additive score biases, attention recording, and head ablation
(``headsteer.ablation.Ablation``). The fast engine's layers go to ``headsteer.fastpath``.

The function reaches the open intervention through the one attribute the session writes on each text
attention module (``LAYER_ATTR``): transformers hands an attention function the module and its
tensors, and nothing else that could say which intervention is open on which model.
"""
from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .ablation import interpolate
from .attention_mask import NEG, additive_mask
from .errors import HeadsteerError
from .fastpath import prefixed_attention
from .spec import heads_mask

LAYER_ATTR = "_headsteer"  # on each text attention module while an intervention is open: (session, layer index)


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


# -- token groups over the keys a layer sees ---------------------------------------------------------
def pad_group(g: torch.Tensor, end: int, fill: bool) -> torch.Tensor:
    T = g.shape[1]
    if T >= end:
        return g[:, :end]
    return torch.cat([g, torch.full((g.shape[0], end - T), fill, dtype=torch.bool, device=g.device)], 1)


def group(groups, name_or_mask, keys):
    """bool [B, k_len]: the group over the keys, ``keys`` = ``key_positions``."""
    if isinstance(name_or_mask, str):
        if name_or_mask not in groups:
            raise HeadsteerError(f"unknown token group {name_or_mask!r}; known: {', '.join(sorted(groups))}")
        g = groups[name_or_mask]
        fill = name_or_mask in ("after_image", "sees_image", "text")  # generated tokens are text after the image
    else:
        g, fill = torch.as_tensor(name_or_mask), False
    pos, end = keys
    return pad_group(g.to(pos.device).bool(), end, fill)[:, pos]


def key_positions(session, q_len: int, k_len: int, layer_idx, device) -> tuple[torch.Tensor, int]:
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
                             "transformers' reference-sliding-window mask then shows the padding keys to the padded "
                             "rows; generate one prompt at a time (no padding)")
    return torch.cat([torch.arange(kept), torch.arange(end - (k_len - kept), end)]).to(device), end


# -- the registered function -------------------------------------------------------------------------
def _base_fn(module, impl: str):
    if impl == "eager":
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return sdpa_attention_forward


def _make_attention(base: str):
    def headsteer_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        entry = module.__dict__.get(LAYER_ATTR)
        if entry is not None:
            session, layer = entry
            if session.capture is not None:
                session.capture[layer] = (key.detach(), value.detach())
            prefix = session.prefix()
            if prefix is not None:
                return prefixed_attention(module, session, layer, prefix, query, key, value, attention_mask, scaling, kwargs)
            if session.layer_active(layer, query.dtype):
                attend = attend_cross if session.ad.cross_attention else attend_eager
                return attend(module, session, layer, query, key, value, attention_mask, scaling, kwargs)
        return _base_fn(module, base)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    headsteer_attention.__name__ = f"headsteer_{base}"
    return headsteer_attention


for _base in ("sdpa", "eager"):
    AttentionInterface.register(f"headsteer_{_base}", _make_attention(_base))
    AttentionMaskInterface.register(f"headsteer_{_base}", sdpa_mask if _base == "sdpa" else eager_mask)


# -- eager arithmetic --------------------------------------------------------------------------------
def repeat_kv(x, n):
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def raw_scores(q, k, scaling):
    return torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling


def scores(q, k, scaling, softcap):
    s = raw_scores(q, k, scaling)
    return s if softcap is None else torch.tanh(s / softcap) * softcap


def part_way(abl, layer, query, key, value, kb, vb, n_rep, scaling, softcap, bias):
    """Rows ablated part of the way (``Ablation.weight``, gradient attribution): each head at its weight
    along the ablation's path (``headsteer.ablation.interpolate``), out of place so autograd can follow."""
    t = abl.layer_weight(layer, query.device)[:, :, None, None]  # [B|1, H, 1, 1]
    w, wb = interpolate(abl.path, t, raw_scores(query, repeat_kv(key, n_rep), scaling),
                        raw_scores(query, repeat_kv(kb, n_rep), scaling), bias, softcap)
    return torch.matmul(w, repeat_kv(value, n_rep).float()) + torch.matmul(wb, repeat_kv(vb, n_rep).float())


def score_bias(session, layer, keys, bias, q_len, k_len, dev):
    """The model's mask plus every active knockout (-inf on the blocked edges) and image-attention
    scaling (log factor on the after-image queries' image keys): additive, fp32."""
    ad = session.ad
    for a in session.actives:
        if not a.edits_attention:
            continue
        groups = session.groups_for(a)
        for ko in a.knockouts:
            hm = heads_mask(ko.heads, ad, dev)[..., layer, :]  # [H] or per example [B, H]
            hm = hm[None] if hm.ndim == 1 else hm
            src = group(groups, ko.src, keys)
            dst = group(groups, ko.dst, keys)[:, k_len - q_len:]
            block = hm[:, :, None, None] & dst[:, None, :, None] & src[:, None, None, :]
            bias = bias.masked_fill(block, NEG)
        if a.image_attn is not None:
            fac = a.image_attn.to(dev)[layer]  # [H]
            img = group(groups, "image", keys)
            aft = group(groups, "after_image", keys)[:, k_len - q_len:]
            logf = torch.log(fac).clamp(min=NEG)
            add = logf[None, :, None, None] * (aft[:, None, :, None] & img[:, None, None, :])
            bias = bias + torch.nan_to_num(add, nan=0.0)
    return bias


def record(session, layer, probs, keys, k_len, q_len):
    # the positions of the innermost spec that acts on attention (its explicit groups, if it has them)
    spec = next((a for a in reversed(session.actives) if a.edits_attention or a.ablation is not None), None)
    g = session.groups_for(spec)
    img = group(g, "image", keys)
    aft = group(g, "after_image", keys)[:, k_len - q_len:]
    last = group(g, "last", keys)[:, k_len - q_len:]
    session.recorder.add(layer, probs, img, aft, last)


def attend_eager(module, session, layer, query, key, value, attention_mask, scaling, kwargs):
    """A self-attention layer with something to do: the model's own attention with the active score
    biases, recorded if asked, with the ablated rows recomputed against the baseline's keys/values."""
    B, Hq, q_len, d = query.shape
    k_len = key.shape[2]
    dev = query.device
    scaling = scaling if scaling is not None else d ** -0.5
    n_rep = Hq // key.shape[1]
    softcap = kwargs.get("softcap")
    keys = key_positions(session, q_len, k_len, getattr(module, "layer_idx", None), dev)
    mask = additive_mask(module, attention_mask, q_len, k_len, dev)
    bias = score_bias(session, layer, keys, torch.zeros(1, 1, q_len, k_len, device=dev) if mask is None else mask, q_len, k_len, dev)
    probs = torch.softmax(scores(query, repeat_kv(key, n_rep), scaling, softcap) + bias, dim=-1)
    out = torch.matmul(probs, repeat_kv(value, n_rep).float())
    if session.recorder is not None:
        record(session, layer, probs, keys, k_len, q_len)
    spec = session.ablating()
    if spec is not None and spec.ablation.acts_on(layer):
        abl, groups = spec.ablation, session.groups_for(spec)
        image_keys = group(groups, "image", keys)
        kb, vb = abl.placed(layer, key, value, image_keys, pad_group(groups["image"].to(dev), keys[1], False), keys[0])
        if abl.weight is None:
            probs_b = torch.softmax(scores(query, repeat_kv(kb, n_rep), scaling, softcap) + bias, dim=-1)
            out_b = torch.matmul(probs_b, repeat_kv(vb, n_rep).float())
        else:
            out_b = part_way(abl, layer, query, key, value, kb, vb, n_rep, scaling, softcap, bias)
        # every text query that sees the image: also tokens between image tiles or images
        sees = group(groups, "sees_image", keys)[:, k_len - q_len:]
        out = torch.where(abl.selected(layer, sees, dev), out_b, out)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def attend_cross(module, session, layer, query, key, value, attention_mask, scaling, kwargs):
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
        probs = torch.softmax(scores(query, repeat_kv(k, n_rep), scaling, None) + bias, dim=-1)
        return torch.matmul(probs, repeat_kv(v, n_rep).float())

    out = attend(key, value)
    if session.recorder is not None:
        groups = session.groups_for(None)
        end = session.past + q_len
        queries = (torch.arange(session.past, end, device=dev), end)  # as key_positions: the queries' positions
        after, last = group(groups, "after_image", queries), group(groups, "last", queries)
        session.recorder.add_mass(layer, written_norm(ad, layer, out), after, last)
    spec = session.ablating()
    if spec is not None and spec.ablation.acts_on(layer):
        abl = spec.ablation
        kb, vb = abl.image_kv(layer, n, key.dtype, dev)  # [Hkv, n, d]
        out_b = (attend(kb[None], vb[None]) if abl.weight is None
                 else part_way(abl, layer, query, key, value, kb[None], vb[None], n_rep, scaling, None, bias))
        out = torch.where(abl.selected(layer, None, dev), out_b, out)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def written_norm(ad, layer, out):
    """[B, H, q]: norm of what each head writes into the residual stream, tanh(gate) * W_O[:, h] @ out_h."""
    w = ad.out_proj(layer).weight.float()
    H, d = out.shape[1], out.shape[-1]
    gate = torch.tanh(ad.gates[layer].detach().to(out.device).float()).reshape(-1)  # one gate, or one per residual channel
    written = torch.einsum("bhqd,ehd->bhqe", out, w.view(w.shape[0], H, d)) * gate
    return written.norm(dim=-1)
