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
    its image tokens sit.

    The copies hold the keys in another order: the non-image positions first, then the image
    positions as one block (in their own order). Attention does not depend on the order of its keys
    (the prefix mask's columns are reordered with them), and with the image as a block the image
    part of every score row is a strided view, never a gathered copy."""

    def __init__(self, cache: PrefixCache, image_positions: torch.Tensor):
        self.cache = cache
        self.length = cache.get_seq_length()  # asks the first attention layer: layer 0 may be recurrent (hybrid stacks)
        img = image_positions.bool().cpu()
        self.n_img = int(img.sum())
        self.n_rest = self.length - self.n_img
        self.order = torch.cat([(~img).nonzero().squeeze(-1), img.nonzero().squeeze(-1)])
        self._reordered = not bool((self.order == torch.arange(self.length)).all())
        self._order_on: dict = {}
        self._kv = [None] * len(cache.layers)
        self._rows = (None, None)

    def order_on(self, device):
        if device not in self._order_on:
            self._order_on[device] = self.order.to(device)
        return self._order_on[device]

    def kv(self, layer):
        """fp32 prefix keys/values of one layer, [Hkv, P, d] each (the precision policy), image last."""
        if self._kv[layer] is None:
            lay = self.cache.layers[layer]
            k, v = lay.keys[0], lay.values[0]
            if self._reordered:
                o = self.order_on(k.device)
                k, v = k[:, o], v[:, o]
            self._kv[layer] = (k.float(), v.float())
        return self._kv[layer]

    def ablated_rows(self, ablate: torch.Tensor, M: int, Hkv: int, s: int, device):
        """For one batch of M masks (bool [M|1, L, Hq] on the host): per layer and KV head, the score rows
        (mask, query head in group, suffix position) whose head is ablated, first, padded with rows
        that are not — ``rows`` int64 [L, Hkv, N] and ``valid`` bool [L, Hkv, N] on ``device``.

        Worked out once per batch on the host (no device sync inside the layers) and sent to the
        device once per batch, not once per layer."""
        held, got = self._rows
        if held is ablate and got[0] == (M, Hkv, s, str(device)):
            return got[1]
        key = ablate
        ablate = ablate.expand(M, -1, -1)
        _, L, Hq = ablate.shape
        G = Hq // Hkv
        mg = ablate.view(M, L, Hkv, G).permute(1, 2, 0, 3).reshape(L, Hkv, M * G)
        counts = mg.sum(-1, keepdim=True)
        # a stable partition in O(n): ablated (mask, group) pairs first, in order, then the others
        pos = torch.where(mg, mg.cumsum(-1) - 1, counts + (~mg).cumsum(-1) - 1)
        order = torch.empty_like(pos).scatter_(-1, pos, torch.arange(M * G).expand_as(pos))
        n = max(1, int(counts.max()))
        order, valid = order[..., :n], torch.arange(n) < counts
        rows = (order[..., None] * s + torch.arange(s)).reshape(L, Hkv, n * s)
        valid = valid[..., None].expand(L, Hkv, n, s).reshape(L, Hkv, n * s)
        if torch.device(device).type == "cuda":
            rows, valid = rows.pin_memory().to(device, non_blocking=True), valid.pin_memory().to(device, non_blocking=True)
        else:
            rows, valid = rows.to(device), valid.to(device)
        self._rows = (key, ((M, Hkv, s, str(device)), (rows, valid)))
        return rows, valid


def prefixed_attention(module, session, layer, pre: Prefix, query, key, value, attention_mask, scaling, kwargs):
    """Attention of suffix queries [M, Hq, s, d] over the shared prefix and their own suffix.

    Rows are laid out per KV head as (mask, query head in group, suffix position). Every row is
    first computed clean; the rows of ablated heads then get their image block recomputed against
    the baseline — only those rows, so the cost of ablation follows the ablation rate. The softmax
    is split into the image block and the rest (non-image prefix keys and the suffix), each with its
    own row maximum, so that an ablated row never divides by a sum that underflowed because the
    real image's scores were far above everything else."""
    for a in session.actives:
        if a.knockouts or a.image_attn is not None:
            raise HeadsteerError("the fast path evaluates head ablations only; use fast=False for knockouts or attention scaling")
    M, Hq, s, d = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    R = M * G * s
    scaling = scaling if scaling is not None else d ** -0.5
    softcap = kwargs.get("softcap")
    pk, pv = pre.kv(module.layer_idx)  # [Hkv, P, d] fp32, image block last; indexed by the model's layer index
    P, nr = pk.shape[1], pre.n_rest
    # Scaled after the matmuls: bf16/fp16 inputs are exact in TF32 (see tf32_for), scaled ones not.
    q = query.float().contiguous()  # [M, Hq, s, d]
    q_rows = q.view(M, Hkv, G * s, d).transpose(0, 1).reshape(Hkv, R, d)
    zero = q.new_zeros(())
    # the GEMM applies the scaling to its fp32 result (alpha): no separate pass over the scores
    sp = torch.baddbmm(zero, q_rows, pk.transpose(1, 2), beta=0, alpha=scaling)  # [Hkv, R, P]
    ss = torch.matmul(q.view(M, Hkv, G * s, d), key.float().transpose(-1, -2)).mul_(scaling)  # [M, Hkv, G*s, s]
    if softcap is not None:
        sp.div_(softcap).tanh_().mul_(softcap)
        ss.div_(softcap).tanh_().mul_(softcap)
    mask = additive_mask(module, attention_mask, s, P + s, query.device)  # [M|1, 1, s, P+s]
    pmask = None
    if mask is not None:
        # The prefix block is all zeros unless a sliding window hides old keys: skip that pass
        # over the largest tensor here when nothing is masked (no mask from the model: causal).
        if attention_mask is not None and bool((mask[..., :P] != 0).any()):
            pmask = mask[..., :P][..., pre.order_on(query.device)]  # columns in the prefix's order
            sp.view(Hkv, -1, G, s, P).add_(pmask)
        ss = ss.view(M, Hkv, G, s, s).add_(mask[:, :, None, :, P:]).view(M, Hkv, G * s, s)
    ss = ss.transpose(0, 1).reshape(Hkv, R, s)
    rest, img = sp[..., :nr], sp[..., nr:]
    top_r = ss.amax(-1, keepdim=True)
    if nr:
        top_r = torch.maximum(top_r, rest.amax(-1, keepdim=True))
    es = ss.sub_(top_r).exp_()
    rest.sub_(top_r).exp_()
    num_r = torch.matmul(es.view(Hkv, M, G * s, s).transpose(0, 1), value.float()).transpose(0, 1).reshape(Hkv, R, d)
    z_r = es.sum(-1, keepdim=True)
    if nr:
        num_r = torch.baddbmm(num_r, rest, pv[:, :nr])
        z_r += rest.sum(-1, keepdim=True)
    if pre.n_img:
        top_i = img.amax(-1, keepdim=True)
        top = torch.maximum(top_r, top_i)
        img.sub_(top).exp_()
        f = (top_r - top).exp_()  # <= 1: the rest, rescaled to the joint maximum
        out = torch.baddbmm(num_r * f, img, pv[:, nr:]).div_(z_r * f + img.sum(-1, keepdim=True))
    else:
        out = num_r / z_r

    abl = session.ablation()
    if pre.n_img and abl is not None and layer in abl.ablate_layers:
        rows, valid = pre.ablated_rows(abl.ablate, M, Hkv, s, query.device)
        rows, valid = rows[layer], valid[layer]  # [Hkv, N]
        at = rows[..., None]
        kb, vb = abl.baseline.image_kv(layer, pre.n_img, torch.float32, query.device)  # [Hkv, n, d]
        sb = torch.baddbmm(zero, q_rows.gather(1, at.expand(-1, -1, d)), kb.transpose(1, 2), beta=0, alpha=scaling)
        if softcap is not None:
            sb.div_(softcap).tanh_().mul_(softcap)
        if pmask is not None:  # the same window hides the same baseline positions
            pm = pmask[..., nr:].expand(M, 1, s, pre.n_img)[:, 0]  # [M, s, n]
            sb += pm[rows // (G * s), rows % s]
        top_ra = top_r.gather(1, at)
        top_a = torch.maximum(top_ra, sb.amax(-1, keepdim=True))
        eb = sb.sub_(top_a).exp_()
        fa = (top_ra - top_a).exp_()
        val = torch.baddbmm(num_r.gather(1, at.expand(-1, -1, d)) * fa, eb, vb)
        val /= z_r.gather(1, at) * fa + eb.sum(-1, keepdim=True)
        # padding rows (heads with fewer ablated rows than the most) keep their clean value
        val = torch.where(valid[..., None], val, out.gather(1, at.expand(-1, -1, d)))
        out.scatter_(1, at.expand(-1, -1, d), val)
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
