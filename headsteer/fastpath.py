"""Fast path of the intervention layer: many head masks over one prompt's text suffix.

Ablation never changes the positions up to the last image token, so their keys/values are computed
once (batch 1) and every mask in a batch reads them. A ``PrefixCache`` hands the model the prefix
length (so positions, rotary phases and masks come out as in a full forward) while each layer's
``update`` returns only the suffix keys/values; ``prefixed_attention`` joins the two.

The prefix is never copied per mask: the masks are folded into the row dimension of the prefix
matmuls ([Hkv, masks x group x suffix, d] @ [Hkv, d, P]), which also serves grouped-query attention
without repeating K/V. The softmax over prefix and suffix keys is joined through a shared row
maximum, so the two score blocks are never concatenated.
"""
from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .attention_mask import additive_mask
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
    """The first ``length`` positions (default: all) of a filled cache, read-only."""

    def __init__(self, cache: DynamicCache, length: int | None = None):
        super().__init__()
        self.layers = [_PrefixLayer(layer.keys[..., :length, :], layer.values[..., :length, :]) for layer in cache.layers]


class Prefix:
    """The shared prefix: per-layer K/V (fp32 copies, [Hkv, P, d], made once per prompt) and where
    its image tokens sit."""

    def __init__(self, cache: PrefixCache, image_positions: torch.Tensor):
        self.cache = cache
        self.length = cache.layers[0].keys.shape[-2]
        idx = image_positions.nonzero().squeeze(-1)
        self.n_img = len(idx)
        contiguous = self.n_img > 0 and int(idx[-1] - idx[0]) + 1 == self.n_img
        self.img = slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx.cpu()  # CPU indices serve any device
        self._kv = [None] * len(cache.layers)

    def kv(self, layer):
        """fp32 prefix keys/values of one layer, [Hkv, P, d] each (the precision policy)."""
        if self._kv[layer] is None:
            lay = self.cache.layers[layer]
            self._kv[layer] = (lay.keys[0].float(), lay.values[0].float())
        return self._kv[layer]


def prefixed_attention(module, session, layer, pre: Prefix, query, key, value, attention_mask, scaling, kwargs):
    """Attention of suffix queries [M, Hq, s, d] over the shared prefix and their own suffix.

    Rows are laid out per KV head as (mask, query head in group, suffix position)."""
    for a in session.actives:
        if a.knockouts or a.image_attn is not None:
            raise HeadsteerError("the fast path evaluates head ablations only; use fast=False for knockouts or attention scaling")
    M, Hq, s, d = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    R = M * G * s
    scaling = scaling if scaling is not None else d ** -0.5
    softcap = kwargs.get("softcap")
    pk, pv = pre.kv(module.layer_idx)  # [Hkv, P, d] fp32; the cache is indexed by the model's layer index
    P = pk.shape[1]
    # Scaled after the matmuls: bf16/fp16 inputs are exact in TF32 (see tf32_for), scaled ones not.
    q = query.float().contiguous()  # [M, Hq, s, d]
    q_rows = q.view(M, Hkv, G * s, d).transpose(0, 1).reshape(Hkv, R, d)
    zero = q.new_zeros(())
    # the GEMM applies the scaling to its fp32 result (alpha): no separate pass over the scores
    sp = torch.baddbmm(zero, q_rows, pk.transpose(1, 2), beta=0, alpha=scaling)  # [Hkv, R, P]
    ss = torch.matmul(q.view(M, Hkv, G * s, d), key.float().transpose(-1, -2)).mul_(scaling)  # [M, Hkv, G*s, s]

    abl = session.ablation()
    ab = vb_delta = None
    if abl is not None and layer in abl.ablate_layers:
        am = abl.ablate[..., layer, :].to(query.device).expand(M, Hq)  # [M, Hq]
        ab = am.view(M, Hkv, G).transpose(0, 1)[..., None, None].expand(Hkv, M, G, s, 1).reshape(Hkv, R, 1)
        kb, vb = abl.baseline.image_kv(layer, pre.n_img, torch.float32, query.device)  # [Hkv, n, d]
        sb = torch.baddbmm(zero, q_rows, kb.transpose(1, 2), beta=0, alpha=scaling)  # [Hkv, R, n]
        sp[..., pre.img] = torch.where(ab, sb, sp[..., pre.img])
        vb_delta = vb - pv[:, pre.img]  # what an ablated row reads instead, minus what it would read
    if softcap is not None:
        sp = torch.tanh(sp / softcap) * softcap
        ss = torch.tanh(ss / softcap) * softcap
    mask = additive_mask(module, attention_mask, s, P + s, query.device)  # [M|1, 1, s, P+s]
    if mask is not None:
        # The prefix block is all zeros unless a sliding window hides old keys: skip that pass
        # over the largest tensor here when nothing is masked (no mask from the model: causal).
        if attention_mask is not None and bool((mask[..., :P] != 0).any()):
            sp.view(Hkv, M, G, s, P).add_(mask[..., :P])
        ss = ss.view(M, Hkv, G, s, s).add_(mask[:, :, None, :, P:]).view(M, Hkv, G * s, s)
    ss = ss.transpose(0, 1).reshape(Hkv, R, s)
    top = torch.maximum(sp.amax(-1, keepdim=True), ss.amax(-1, keepdim=True))
    ep = sp.sub_(top).exp_()
    es = ss.sub_(top).exp_()
    z = ep.sum(-1, keepdim=True) + es.sum(-1, keepdim=True)
    out = torch.bmm(ep, pv)  # [Hkv, R, d]
    es_m = es.view(Hkv, M, G * s, s).transpose(0, 1)  # [M, Hkv, G*s, s]
    out += torch.matmul(es_m, value.float()).transpose(0, 1).reshape(Hkv, R, d)
    if vb_delta is not None:
        out += torch.bmm(ep[..., pre.img], vb_delta) * ab
    out /= z
    return out.view(Hkv, M, G, s, d).permute(1, 3, 0, 2, 4).reshape(M, s, Hq, d).to(query.dtype), None


@contextlib.contextmanager
def tf32_for(dtype, device):
    """TF32 for the fp32 attention matmuls of a bf16/fp16 model on CUDA. Its inputs (bf16/fp16
    queries and keys upcast to fp32) have at most 10 mantissa bits, which TF32 holds exactly, so
    QK^T loses nothing against fp32 while running on tensor cores."""
    if dtype not in (torch.bfloat16, torch.float16) or torch.device(device).type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
