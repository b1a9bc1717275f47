"""Logits of one (image, question) under many head-ablation masks: a naive reference path (a full
forward per mask) and the fast path (shared prefix, batch of masks over the text suffix). Both
return CPU float32 tensors: this is where results cross from the model's device to the host."""
from __future__ import annotations

import time

import torch
from transformers.cache_utils import DynamicCache

from headsteer.adapters import get_adapter
from headsteer.baseline import as_baseline
from headsteer.errors import HeadsteerError
from headsteer.fastpath import Prefix, PrefixCache, tf32_for
from headsteer.hybrid_prefix import HybridPrefixCache, filling_cache
from headsteer.intervene import Spec, intervene
from headsteer.selfcheck import compare

# Families that always take the naive path, and why. Prefix-LM families: image positions attend to
# the prompt text after them, so the prefix is not invariant under ablation.
NO_FAST_PATH = {"paligemma": "PaliGemma attends bidirectionally over the image and the prompt",
                "blip-2": "its forward needs pixel_values on every call, so it cannot run the text suffix alone",
                "instructblip": "its forward needs pixel_values on every call, so it cannot run the text suffix alone",
                # cross-attention families: the image reaches the text only through cross-attention layers
                "mllama": "image information reaches the text through cross-attention layers (naive path only)",
                "idefics": "image information reaches the text through cross-attention layers (naive path only)"}

_SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
# Families whose text after the image is embedded differently in a forward given the pixels (Ovis2's
# visual indicator tokens <IMG_GRID>, <IMG_END> get the vision branch's embeddings): the fast path feeds
# the suffix as the embeddings the model gave its language model in one full forward (ablation acts
# after the embeddings, so they are the same for every mask).
SUFFIX_EMBEDS = {"ovis2"}

__all__ = ["NO_FAST_PATH", "SuffixRunner", "fast_path_refusal", "ablated_logits", "as_baseline", "check_masks", "naive_logits"]


_SPLIT = ("text tokens between image tokens (tile markers, or several images), or a marker opening a bidirectional "
          "image block, read the image inside the prefix, so ablation changes the prefix and it cannot be shared")


def fast_path_refusal(ad, input_ids=None) -> str | None:
    """Why this model (or this prompt's layout, when ``input_ids`` [1, T] is given) has no fast
    path (None: it has one)."""
    if ad.model_type in NO_FAST_PATH:
        return NO_FAST_PATH[ad.model_type]
    if input_ids is not None:
        groups = ad.token_groups(input_ids)
        img = groups["image"][0]
        if bool(img.any()):
            end = int(img.nonzero().max()) + 1
            if bool(groups["sees_image"][0, :end].any()):
                return _SPLIT
    return None


def check_masks(masks, ad) -> torch.Tensor:
    """bool [M, L, H] on the host (True = ablated)."""
    masks = torch.as_tensor(masks)
    if masks.is_floating_point():
        raise HeadsteerError("masks must be bool (True = ablated); got floats — threshold them, e.g. masks > 0.5")
    masks = masks.bool().cpu()
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or tuple(masks.shape[1:]) != (ad.num_layers, ad.num_heads):
        raise HeadsteerError(f"masks must be bool [M, {ad.num_layers}, {ad.num_heads}] (True = ablated); got {tuple(masks.shape)}")
    return masks


def _model_device_dtype(model):
    p = next(model.parameters())
    return p.device, p.dtype


def auto_chunk(model, prefix_len: int, suffix_len: int, ad, state_bytes: int = 0) -> int:
    """Masks per batch: 256 on the CPU; on a GPU as many as about half the free memory holds
    (fp32 attention scores of the suffix over the prefix, twice, as the fp32 blocks need where no fused
    kernel serves — an over-estimate where one does — plus the suffix activations, plus
    ``state_bytes``: one mask's recurrent state in the largest recurrent layer of a hybrid stack, which
    each mask reads as its own copy and updates for itself), at most 1,024: a 7B model's forward is
    already compute-bound at 256, and larger batches only raise the peak memory."""
    device, dtype = _model_device_dtype(model)
    if device.type != "cuda":
        return 256
    free, _ = torch.cuda.mem_get_info(device)
    tc = model.config.get_text_config()
    width = getattr(tc, "hidden_size", ad.num_heads * ad.head_dim)
    inter = getattr(tc, "intermediate_size", 4 * width) or 4 * width
    per_mask = (2 * 4 * ad.num_heads * suffix_len * (prefix_len + suffix_len)  # scores, fp32
                + suffix_len * (8 * width + 3 * inter) * dtype.itemsize  # activations
                + 4 * getattr(tc, "vocab_size", 32000)  # last-position logits, fp32
                + 4 * state_bytes)  # the prefix state's per-batch copy, the updated state, the kernels' temporaries
    return int(max(8, min(1024, (free // 2) // per_mask // 8 * 8)))


class SuffixRunner:
    """One prompt, prepared once; ``__call__(masks)`` gives last-position logits [M, vocab] (CPU,
    float32). ``chunk``: masks per batch (None: from free GPU memory)."""

    def __init__(self, model, processor, image, question, baseline, inputs=None, chunk=None):
        self.model, self.ad = model, get_adapter(model, processor)
        self.baseline = baseline
        self.inputs = inputs if inputs is not None else self.ad.encode([image], [question])
        ids = self.inputs["input_ids"]
        if ids.shape[0] != 1:
            raise HeadsteerError("the fast path takes one prompt at a time")
        reason = fast_path_refusal(self.ad, ids)
        if reason is not None:
            raise HeadsteerError(f"no fast path for {self.ad.model_type}: {reason}; use fast=False")
        img = self.ad.image_mask(ids)[0]
        if not bool(img.any()):
            raise HeadsteerError("the prompt has no image tokens: give an image")
        self.P = int(img.nonzero().max()) + 1
        if self.P >= ids.shape[1]:
            raise HeadsteerError("the prompt ends with the image: there is no text after it to ablate")
        self.device, self.dtype = _model_device_dtype(model)
        self.positions = None
        # A plain DynamicCache keeps every prefix position, also for sliding-window layers; the
        # prefix runs under the same attention arithmetic as every ablated forward.
        with torch.no_grad(), tf32_for(self.dtype, self.device), intervene(model, fp32_attention=True):
            if self.ad.own_positions and not self.ad.hybrid:
                # Positions come from the whole prompt's layout (3D RoPE: the image grid, the markers
                # after it): run the whole prompt once, keep the positions the model gave its language
                # model and the prefix part of the cache (the prefix is causal, so it is the same).
                filled = DynamicCache()  # filled in place (not every family returns it as out.cache)
                pos = _with_positions(model, self.ad, dict(self.inputs, cache=filled, use_cache=True, logits_to_keep=1))
                self.positions = pos[..., self.P :]
                cache = PrefixCache(filled, self.P)
            else:
                pre = {k: (v[:, : self.P] if k in _SEQ_KEYS and torch.is_tensor(v) else v) for k, v in self.inputs.items()}
                if self.ad.own_positions:
                    # A recurrent state cannot be cut back to the prefix as K/V can: the positions come
                    # from the whole prompt, the cache from a forward of the prefix alone.
                    pos = _with_positions(model, self.ad, dict(self.inputs, use_cache=False, logits_to_keep=1))
                    self.positions, pre["position_ids"] = pos[..., self.P :], pos[..., : self.P]
                filled = filling_cache(model) if self.ad.hybrid else DynamicCache()
                model(**pre, cache=filled, use_cache=True, logits_to_keep=1)
                cache = HybridPrefixCache(filled) if self.ad.hybrid else PrefixCache(filled)
            self.suffix_embeds = None
            if self.ad.model_type in SUFFIX_EMBEDS:
                got = _language_model_inputs(model, self.ad, dict(self.inputs, use_cache=False, logits_to_keep=1))
                self.suffix_embeds = got["inputs_embeds"][:, self.P :]
        self.prefix = Prefix(cache, img[: self.P])
        self.suffix = ids[:, self.P :]
        self.chunk = chunk or auto_chunk(model, self.P, self.suffix.shape[1], self.ad, _state_bytes(cache))

    @torch.no_grad()
    def __call__(self, masks, reduce=None) -> torch.Tensor:
        """``reduce``: applied on the device to each batch's [m, vocab] float32 logits, so that only
        what the caller needs crosses to the host (on a 7B model, copying every vocabulary logit took
        a sixth of the fast path's time)."""
        masks = check_masks(masks, self.ad)
        outs = []
        with tf32_for(self.dtype, self.device):
            for i in range(0, len(masks), self.chunk):
                m = masks[i : i + self.chunk]
                with intervene(self.model, Spec(ablate=m, baseline=self.baseline, prefix=self.prefix)):
                    if self.suffix_embeds is None:
                        kw = {"input_ids": self.suffix.expand(len(m), -1)}
                    else:
                        kw = {"inputs_embeds": self.suffix_embeds.expand(len(m), -1, -1)}
                    if self.positions is not None:
                        kw["position_ids"] = self.positions.expand(*self.positions.shape[:-2], len(m), -1)
                    cache = self.prefix.cache
                    if isinstance(cache, HybridPrefixCache):
                        cache = cache.at_batch(len(m))  # recurrent states viewed at this batch's size
                    logits = self.model(cache=cache, use_cache=True, logits_to_keep=1, **kw).logits
                last = logits[:, -1].float()
                outs.append(last if reduce is None else reduce(last))
        return torch.cat(outs).cpu()


def _state_bytes(cache) -> int:
    """One mask's recurrent state in the largest recurrent layer of a prefix cache (0 without any)."""
    sizes = [sum(t.numel() * t.element_size() for d in (lay.conv_states, lay.recurrent_states) for t in d.values()
                 if t is not None) for lay in cache.layers if hasattr(lay, "recurrent_states")]
    return max(sizes, default=0)


def _language_model_inputs(model, ad, inputs) -> dict:
    """The keyword arguments the model passed to its language model in one forward."""
    got = {}

    def hook(mod, args, kwargs):
        if not got:
            got.update(kwargs)

    handle = ad.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return got


def _with_positions(model, ad, inputs):
    """The position ids the model passed to its language model in one forward."""
    pos = _language_model_inputs(model, ad, inputs).get("position_ids")
    if pos is None:
        raise HeadsteerError(f"{ad.model_type}: the model gave its language model no position ids; use fast=False")
    return pos


@torch.no_grad()
def naive_logits(model, processor, inputs, masks, baseline, reduce=None) -> torch.Tensor:
    """Reference: a full forward (vision tower included) per mask. CPU float32 [M, vocab], or what
    ``reduce`` makes of them on the device (as in ``SuffixRunner``)."""
    ad = get_adapter(model, processor)
    masks = check_masks(masks, ad)
    device, dtype = _model_device_dtype(model)
    out = []
    with tf32_for(dtype, device):
        for m in masks:
            with intervene(model, ablate=m[None], baseline=baseline):
                out.append(model(**inputs, logits_to_keep=1).logits[:, -1].float())
    out = torch.cat(out)
    return (out if reduce is None else reduce(out)).cpu()


def check_fast_path(model, processor, inputs, baseline, rate: float = 0.1, n_masks: int = 4, seed: int = 0):
    """The run-time check of the fast path on one prompt (``headsteer.selfcheck``): a callable taking
    the rounding ``floor`` and returning its figures — fast against naive on ``n_masks`` masks (no head,
    every head, and random ones at ``rate``). None where the prompt takes the naive path anyway."""
    ad = get_adapter(model, processor)
    if fast_path_refusal(ad, inputs["input_ids"]) is not None:
        return None

    def check(floor: float) -> dict:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        masks = torch.rand(n_masks, ad.num_layers, ad.num_heads, generator=g) < rate
        masks[0], masks[1] = False, True
        try:
            fast = SuffixRunner(model, processor, None, None, baseline, inputs=inputs)(masks)
        except Exception as e:  # a fast path that cannot even run here is a failed check, not a crash
            return {"passed": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                    "masks": n_masks, "seconds": round(time.perf_counter() - t0, 3)}
        out = compare(fast, naive_logits(model, processor, inputs, masks, baseline), next(model.parameters()).dtype, floor)
        out.update(masks=n_masks, seconds=round(time.perf_counter() - t0, 3))
        return out

    return check


def ablated_logits(model, processor, image, question, masks, baseline="mean", fast=True, chunk=None):
    """Float tensor [M, vocab] on the host: last-position logits of (image, question) with each
    mask's heads ablated (``masks`` bool [M, L, H], True = ablated). ``baseline``: "mean",
    "blank", "zero" or a ``Baseline``. ``fast=False`` runs the naive reference path."""
    ad = get_adapter(model, processor)
    base = as_baseline(model, processor, baseline)
    masks = check_masks(masks, ad)
    inputs = ad.encode([image], [question])
    if fast and fast_path_refusal(ad, inputs["input_ids"]) is None:
        return SuffixRunner(model, processor, None, None, base, inputs=inputs, chunk=chunk)(masks)
    return naive_logits(model, processor, inputs, masks, base)
