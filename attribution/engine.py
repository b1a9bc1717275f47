"""Logits of one (image, question) under many head-ablation masks: a naive reference path (a full
forward per mask) and the fast path (shared prefix, batch of masks over the text suffix)."""
from __future__ import annotations

import hashlib

import torch
from transformers.cache_utils import DynamicCache

from headsteer.adapters import get_adapter
from headsteer.baseline import Baseline, make_baseline
from headsteer.errors import HeadsteerError
from headsteer.fastpath import Prefix, PrefixCache
from headsteer.intervene import intervene

# Prefix-LM families: image positions attend to the prompt text after them, so the prefix is not
# invariant under ablation and the shared-prefix path would not be exact.
NO_FAST_PATH = {"paligemma": "PaliGemma attends bidirectionally over the image and the prompt"}

_SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def as_baseline(model, processor, baseline, dataset=None) -> Baseline:
    """A Baseline from a name. The ``mean`` reference set is the easy-VQA train images for easy-VQA
    data and otherwise the data set's own first 64 distinct images (so that the image size, and
    with it the number of image tokens, matches what is ablated)."""
    if isinstance(baseline, Baseline):
        return baseline
    reference = None
    if baseline == "mean" and dataset is not None and "image_id" not in dataset.column_names:
        seen, reference = set(), []
        for i in range(min(len(dataset), 256)):
            im = dataset[i]["image"]
            key = hashlib.sha1(im.tobytes()).hexdigest()
            if key not in seen:
                seen.add(key)
                reference.append(im)
            if len(reference) == 64:
                break
    return make_baseline(model, processor, baseline, reference=reference)


def check_masks(masks, ad) -> torch.Tensor:
    masks = torch.as_tensor(masks).bool()
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or tuple(masks.shape[1:]) != (ad.num_layers, ad.num_heads):
        raise HeadsteerError(f"masks must be bool [M, {ad.num_layers}, {ad.num_heads}] (True = ablated); got {tuple(masks.shape)}")
    return masks


class SuffixRunner:
    """One prompt, prepared once; ``__call__(masks)`` gives last-position logits [M, vocab]."""

    def __init__(self, model, processor, image, question, baseline, inputs=None, chunk=256):
        self.model, self.ad = model, get_adapter(model, processor)
        if self.ad.model_type in NO_FAST_PATH:
            raise HeadsteerError(f"no fast path for {self.ad.model_type}: {NO_FAST_PATH[self.ad.model_type]}; use fast=False")
        self.baseline = baseline
        self.chunk = chunk
        self.inputs = inputs if inputs is not None else self.ad.encode([image], [question])
        ids = self.inputs["input_ids"]
        if ids.shape[0] != 1:
            raise HeadsteerError("the fast path takes one prompt at a time")
        img = self.ad.image_mask(ids)[0]
        if not bool(img.any()):
            raise HeadsteerError("the prompt has no image tokens: give an image")
        self.P = int(img.nonzero().max()) + 1
        if self.P >= ids.shape[1]:
            raise HeadsteerError("the prompt ends with the image: there is no text after it to ablate")
        pre = {k: (v[:, : self.P] if k in _SEQ_KEYS and torch.is_tensor(v) else v) for k, v in self.inputs.items()}
        with torch.no_grad():
            # A plain DynamicCache keeps every prefix position, also for sliding-window layers.
            out = model(**pre, cache=DynamicCache(), use_cache=True, logits_to_keep=1)
        self.cache = PrefixCache(out.past_key_values)
        self.prefix = Prefix(self.cache, img[: self.P])
        self.suffix = ids[:, self.P :]

    @torch.no_grad()
    def __call__(self, masks) -> torch.Tensor:
        masks = check_masks(masks, self.ad)
        outs = []
        for i in range(0, len(masks), self.chunk):
            m = masks[i : i + self.chunk]
            with intervene(self.model, ablate=m, baseline=self.baseline):
                self.model._headsteer_state.prefix = self.prefix
                ids = self.suffix.expand(len(m), -1)
                logits = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1).logits
            outs.append(logits[:, -1].float())
        return torch.cat(outs)


@torch.no_grad()
def naive_logits(model, processor, inputs, masks, baseline) -> torch.Tensor:
    """Reference: a full forward (vision tower included) per mask."""
    ad = get_adapter(model, processor)
    masks = check_masks(masks, ad)
    out = []
    for m in masks:
        with intervene(model, ablate=m[None], baseline=baseline):
            out.append(model(**inputs, logits_to_keep=1).logits[0, -1].float())
    return torch.stack(out)


def ablated_logits(model, processor, image, question, masks, baseline="mean", fast=True, chunk=256):
    """Float tensor [M, vocab]: last-position logits of (image, question) with each mask's heads
    ablated (``masks`` bool [M, L, H], True = ablated). ``baseline``: "mean", "blank", "zero" or a
    ``Baseline``. ``fast=False`` runs the naive reference path."""
    ad = get_adapter(model, processor)
    base = as_baseline(model, processor, baseline)
    masks = check_masks(masks, ad)
    if fast and ad.model_type not in NO_FAST_PATH:
        return SuffixRunner(model, processor, image, question, base, chunk=chunk)(masks)
    return naive_logits(model, processor, ad.encode([image], [question]), masks, base)
