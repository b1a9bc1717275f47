"""Fast path of the intervention layer: many head masks over one prompt's text suffix.

Ablation never changes the positions up to the last image token, so their keys/values are computed
once (batch 1) and every mask in a batch reads them. A ``PrefixCache`` hands the model the prefix
length (so positions, rotary phases and masks come out as in a full forward) while each layer's
``update`` returns only the suffix keys/values; ``prefixed_attention`` joins the two.

The prefix is never copied per mask: the masks are folded into the row dimension of the prefix
matmuls ([Hkv, masks x group x suffix, d] @ [Hkv, d, P]), which also serves grouped-query attention
without repeating K/V. Blocks of keys (the prefix, the suffix; for ablated rows the prefix text, the
baseline image, the suffix) are attended on their own and merged through their log-sum-exps, so the
prefix can go to a fused kernel (flash attention, scores never written to memory) and no score
blocks are ever concatenated.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .ablation import interpolate
from .attention_mask import additive_mask
from .errors import HeadsteerError


def seen_tokens(cache) -> int:
    """The tokens a cache holds, as a Python int. transformers 5.25 answers from layer 0 even where it is
    a recurrent layer (5.24 asked the first attention layer), with a 0-dim tensor that the layer then
    increments in place during the forward: a reference kept to it would change under the reader."""
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


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
    """The shared prefix: per-layer K/V (copies, [Hkv, P, d], made once per prompt) and where its
    image tokens sit.

    The copies hold the keys in another order: the non-image positions first, then the image
    positions as one block (in their own order). Attention does not depend on the order of its keys
    (the prefix mask's columns are reordered with them), and with the image as a block the ablated
    rows read the prefix text as a slice, never a gathered copy."""

    def __init__(self, cache: PrefixCache, image_positions: torch.Tensor, fused: bool = True):
        self.cache = cache
        # the runner's kernel choice: ``fused`` lets a flash kernel serve the prefix block where one does;
        # a device whose kernel refused a block goes on with the fp32 blocks (``failed``)
        self.fused, self.failed = fused, set()
        self.length = seen_tokens(cache)
        img = image_positions.bool().cpu()
        self.n_img = int(img.sum())
        self.n_rest = self.length - self.n_img
        self.order = torch.cat([(~img).nonzero().squeeze(-1), img.nonzero().squeeze(-1)])
        self._reordered = not bool((self.order == torch.arange(self.length)).all())
        self._order_on: dict = {}
        self._kv = [None] * len(cache.layers)
        self._masks: dict = {}

    def order_on(self, device):
        if device not in self._order_on:
            self._order_on[device] = self.order.to(device)
        return self._order_on[device]

    def kv(self, layer):
        """Prefix keys/values of one layer in the model's dtype, [Hkv, P, d] each, image last."""
        if self._kv[layer] is None:
            lay = self.cache.layers[layer]
            k, v = lay.keys[0], lay.values[0]
            if self._reordered:
                o = self.order_on(k.device)
                k, v = k[:, o], v[:, o]
            self._kv[layer] = (k.contiguous(), v.contiguous())
        return self._kv[layer]

    def masks(self, module, attention_mask, s: int, device):
        """The model's mask for s suffix queries, split: the suffix block (additive fp32, broadcasting
        to [M, Hkv, G, s, s], or None) and the prefix block ([s, P] in the prefix's column order, or
        None when it hides nothing: the usual case, without a sliding window).

        Worked out once per mask tensor the model hands its layers (one per layer type and batch):
        finding out whether the prefix block hides anything reads it on the host, and once per layer
        that would stall the GPU's queue at every layer. Every mask row is the same prompt, so row 0
        stands for all."""
        key = (id(attention_mask), s, getattr(module, "is_causal", True), str(device))
        if key not in self._masks:
            if len(self._masks) >= 8:
                self._masks.clear()
            P = self.length
            mask = additive_mask(module, attention_mask, s, P + s, device)  # [M|1, 1, s, P+s]
            smask = pmask = None
            if mask is not None:
                smask = mask[:1, :, None, :, P:]
                # no mask from the model means causal: the prefix block is all zeros, no need to look
                if attention_mask is not None and bool((mask[0, 0, :, :P] != 0).any()):
                    pmask = mask[0, 0, :, :P][:, self.order_on(device)]
            # the mask object is kept with its entry, so its id is not reused while the entry lives
            self._masks[key] = (attention_mask, smask, pmask)
        return self._masks[key][1:]

def prefixed_attention(module, session, layer, pre: Prefix, query, key, value, attention_mask, scaling, kwargs):
    """Attention of suffix queries [M, Hq, s, d] over the shared prefix and their own suffix.

    Rows are laid out per KV head as (mask, query head in group, suffix position). Every row first
    attends clean: the prefix as one block (the fused kernel's work, and most of this function's)
    and its own suffix as another, each giving an output and its log-sum-exp, merged exactly through
    them. The rows of ablated heads are then recomputed from three blocks — the prefix text, the
    baseline's image, the suffix — for those rows only, so the cost of ablation follows the ablation
    rate. Each block having its own row maximum keeps an ablated row exact also when the real
    image's scores dwarf everything else."""
    if any(a.edits_attention for a in session.actives):
        raise HeadsteerError("the fast path evaluates head ablations only; use fast=False for knockouts or attention scaling")
    M, Hq, s, d = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    scaling = scaling if scaling is not None else d ** -0.5
    softcap = kwargs.get("softcap")
    pk, pv = pre.kv(module.layer_idx)  # [Hkv, P, d], image block last; indexed by the model's layer index
    nr = pre.n_rest
    smask, pmask = pre.masks(module, attention_mask, s, query.device)
    spec = session.ablating()
    abl = spec.ablation if spec is not None else None
    if torch.is_grad_enabled() and (query.requires_grad or (abl is not None and abl.weight is not None)):
        return differentiable(layer, pre, pk, pv, query, key, value, smask, pmask, scaling, softcap, abl)
    # one copy into the row layout ([M, Hq, s, d] usually comes as a transposed view)
    q_rows = query.view(M, Hkv, G, s, d).transpose(0, 1).reshape(Hkv, M * G * s, d)

    # the suffix block: each mask's own keys (few), in fp32; one block per (mask, KV head)
    so, slse = attend_block(query.reshape(M * Hkv, G * s, d), key.reshape(M * Hkv, s, d), value.reshape(M * Hkv, s, d),
                            scaling, softcap, None if smask is None else smask[0], fused=False)
    suffix = (so.view(M, Hkv, G * s, d).transpose(0, 1).reshape(Hkv, -1, d),
              slse.view(M, Hkv, G * s, 1).transpose(0, 1).reshape(Hkv, -1, 1))
    out = merge(suffix, attend_block(q_rows, pk, pv, scaling, softcap, pmask, fused=pre.fused, failed=pre.failed))[0]

    if abl is not None and abl.acts_on(layer):
        rows, valid = abl.fast_rows(M, Hkv, s, query.device)
        at = rows[layer][..., None]  # [Hkv, N, 1]
        atd = at.expand(-1, -1, d)
        q_abl = q_rows.gather(1, atd)
        kb, vb = abl.image_kv(layer, pre.n_img, query.dtype, query.device)  # [Hkv, n, d]
        # the same window hides the same positions: row r is suffix position r % s
        bias = None if pmask is None else pmask[at[..., 0] % s][:, None]  # [Hkv, 1, N, P]
        blocks = [(suffix[0].gather(1, atd), suffix[1].gather(1, at)),
                  attend_block(q_abl, kb, vb, scaling, softcap, None if bias is None else bias[..., nr:], fused=pre.fused,
                               failed=pre.failed)]
        if nr:
            blocks.append(attend_block(q_abl, pk[:, :nr], pv[:, :nr], scaling, softcap, None if bias is None else bias[..., :nr],
                                       fused=pre.fused, failed=pre.failed))
        # padding rows (heads with fewer ablated rows than the most) keep their clean value
        out.scatter_(1, atd, torch.where(valid[layer][..., None], merge(*blocks)[0], out.gather(1, atd)))
    return out.to(query.dtype).view(Hkv, M, G, s, d).permute(1, 3, 0, 2, 4).reshape(M, s, Hq, d), None


def differentiable(layer, pre: Prefix, pk, pv, query, key, value, smask, pmask, scaling, softcap, abl):
    """``prefixed_attention`` for a forward that builds a graph (gradient attribution): every row in one
    softmax over all its keys — the shared prefix, still read through the row folding, and its own
    suffix — out of place so that autograd can follow, and no fused kernel (it returns no gradient of
    its log-sum-exp). Ablated rows sit at their weight along the ablation's path
    (``headsteer.ablation.interpolate``; with no weight, fully ablated). The prefix K/V hold no graph:
    gradients flow through the suffix only. Costs a [KV heads, rows, prefix + suffix] fp32 score tensor
    per layer, kept for the backward pass."""
    M, Hq, s, d = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    nr, P = pre.n_rest, pre.length
    q = query.float().reshape(M, Hkv, G * s, d)
    q_rows = q.transpose(0, 1).reshape(Hkv, M * G * s, d)  # rows (mask, query head in group, position) per KV head
    s_pre = torch.matmul(q_rows, pk.float().transpose(1, 2)) * scaling  # [Hkv, R, P]
    s_suf = (torch.matmul(q, key.float().transpose(-1, -2)) * scaling).transpose(0, 1).reshape(Hkv, M * G * s, s)
    # the model's mask, by suffix position (row r is position r % s): prefix columns, then suffix columns
    bias = torch.cat([query.new_zeros((s, P), dtype=torch.float32) if pmask is None else pmask,
                      query.new_zeros((s, s), dtype=torch.float32) if smask is None else smask[0].reshape(s, s)], -1)
    shape = (Hkv, M * G, s, P + s)
    sc = torch.cat([s_pre, s_suf], -1).view(shape)
    if abl is None or not abl.acts_on(layer):
        w = torch.softmax((sc if softcap is None else torch.tanh(sc / softcap) * softcap) + bias, dim=-1)
        wb = None
    else:
        kb, vb = abl.image_kv(layer, pre.n_img, query.dtype, query.device)  # [Hkv, n, d]
        s_img = torch.matmul(q_rows, kb.float().transpose(1, 2)) * scaling
        sc_b = torch.cat([s_pre[..., :nr], s_img, s_suf], -1).view(shape)
        t = abl.layer_weight(layer, query.device).expand(M, Hq).reshape(M, Hkv, G).transpose(0, 1)  # [Hkv, M, G]
        w, wb = interpolate(abl.path, t.reshape(Hkv, M * G, 1, 1), sc, sc_b, bias, softcap)
    w = w.reshape(Hkv, M * G * s, P + s)
    wb = None if wb is None else wb.reshape(Hkv, M * G * s, P + s)
    both = w if wb is None else w + wb  # the weights on keys whose values the baseline leaves as they are
    suffix = torch.matmul(both[..., P:].reshape(Hkv, M, G * s, s).transpose(0, 1), value.float())  # [M, Hkv, G*s, d]
    out = torch.matmul(both[..., :nr], pv[:, :nr].float()) + torch.matmul(w[..., nr:P], pv[:, nr:].float())
    out = out + suffix.transpose(0, 1).reshape(Hkv, M * G * s, d)
    if wb is not None:
        out = out + torch.matmul(wb[..., nr:P], vb.float())
    return out.to(query.dtype).view(Hkv, M, G, s, d).permute(1, 3, 0, 2, 4).reshape(M, s, Hq, d), None


def merge(*blocks):
    """Attention blocks of the same rows, each (output [H, R, d], log-sum-exp fp32 [H, R, 1]), as one
    (fp32): the softmax over the union of their keys."""
    top = blocks[0][1]
    for _, lse in blocks[1:]:
        top = torch.maximum(top, lse)
    w = [(lse - top).exp_() for _, lse in blocks]
    z = w[0].clone()
    for wi in w[1:]:
        z += wi
    out = blocks[0][0] * w[0].div_(z)  # fp32 (bf16/fp16 outputs promote), one pass
    for (o, _), wi in zip(blocks[1:], w[1:]):
        out.addcmul_(o, wi.div_(z))
    return out, z.log_().add_(top)


# Fused attention kernels that also return the log-sum-exp, by device type (others have none).
_FLASH = {dev: getattr(torch.ops.aten, name) for dev, name in (("cpu", "_scaled_dot_product_flash_attention_for_cpu"),
                                                                ("cuda", "_scaled_dot_product_flash_attention"))
          if hasattr(torch.ops.aten, name)}


def flash_ok(q, k=None, v=None) -> bool:
    """Whether a fused kernel serves this block: on the CPU in any dtype; on CUDA in bf16/fp16 with a
    head size the kernel takes, on a card that has it (Ampere or newer). Inputs of one dtype."""
    if q.device.type not in _FLASH or any(t is not None and t.dtype != q.dtype for t in (k, v)):
        return False
    if q.device.type == "cpu":
        return True
    return (q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and _capability(q.device) >= (8, 0))


@functools.lru_cache(maxsize=None)
def _capability(device) -> tuple:
    return torch.cuda.get_device_capability(device)


def attend_block(q, k, v, scaling, softcap=None, bias=None, fused=True, failed: set | None = None):
    """softmax(q k^T * scaling) v over one block of keys: q [H, R, d], k/v [H, n, d] in the model's
    dtype → (output [H, R, d], log-sum-exp fp32 [H, R, 1]). ``bias`` (additive, fp32) broadcasts to
    the scores viewed as [H, R/r, r, n] with r = bias.shape[-2]. ``fused=False``: always the fp32
    arithmetic (the suffix block, a few keys per row; a runner without the fused kernel). ``failed``: the
    devices whose kernel refused a block (they go on with the fp32 blocks; a refusal is added to it).

    Precision policy: scores, softmax and sums in fp32 on bf16/fp16 inputs. A fused kernel (flash
    attention) serves blocks without bias or softcap — it also rounds the probabilities to the input
    dtype for the product with V, as the model's own SDPA forward does; the rest run here in fp32."""
    failed = set() if failed is None else failed
    if fused and softcap is None and bias is None and str(q.device) not in failed and flash_ok(q, k, v):
        try:
            out, lse = _FLASH[q.device.type](q[None], k.contiguous()[None], v.contiguous()[None], scale=scaling)[:2]
            return out[0], lse[0, :, : q.shape[1], None]  # a kernel may pad its log-sum-exp rows
        except RuntimeError as e:  # a card or build whose kernel does not take this block: same results, slower
            failed.add(str(q.device))
            warnings.warn(f"the fused attention kernel failed on {q.device} ({str(e).splitlines()[0][:200]}); "
                          "the fast path goes on with its fp32 blocks (same results, slower)", stacklevel=2)
    # Scaled after the matmul: bf16/fp16 inputs are exact in TF32 (see tf32_for), scaled ones not;
    # the GEMM applies the scaling to its fp32 result (alpha), no separate pass over the scores.
    sc = torch.baddbmm(q.new_zeros((), dtype=torch.float32), q.float(), k.float().transpose(1, 2), beta=0, alpha=scaling)
    if softcap is not None:
        sc.div_(softcap).tanh_().mul_(softcap)
    if bias is not None:
        sc.view(sc.shape[0], -1, bias.shape[-2], sc.shape[-1]).add_(bias)
    top = sc.amax(-1, keepdim=True)
    e = sc.sub_(top).exp_()
    z = e.sum(-1, keepdim=True)
    return torch.bmm(e, v.float()).div_(z), z.log_().add_(top)


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
