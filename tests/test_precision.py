"""The precision contract: in bf16/fp16, every attention path's error against an fp32 run of the same
weights is at most 1.5x (+1e-3) that of a plain eager implementation of the same ablation in that
dtype which does the attention arithmetic in fp32 (the reference below, written independently of
headsteer's intervention layer)."""
import copy

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from headsteer import fastpath, get_adapter
from headsteer.attribution.engine import AblationRunner, naive_logits
from test_intervene import mean_like_baseline
from tiny_models import tiny

_REF = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kw):
    layer = _REF["ordinal"][module.layer_idx]  # heads are numbered by attention layer (hybrid stacks)
    G = query.shape[1] // key.shape[1]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5

    def attend(k, v):
        k, v = k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
        s = query.float() @ k.transpose(-1, -2) * scaling
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if attention_mask is not None:
            m = attention_mask[:, :, :, : k.shape[2]]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        return torch.softmax(s, -1) @ v

    out = attend(key, value)
    masks, img, after, base = _REF["masks"], _REF["img"], _REF["after"], _REF["base"]
    if masks[:, layer].any():
        kb, vb = key.clone(), value.clone()
        bk, bv = base.image_kv(layer, int(img[0].sum()), key.dtype, key.device)
        kb[:, :, img[0]] = bk
        vb[:, :, img[0]] = bv
        sel = masks[:, layer].to(query.device)[:, :, None, None] & after.to(query.device)[:, None, :, None]
        out = torch.where(sel, attend(kb, vb), out)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("test_reference", _reference_attention)
AttentionMaskInterface.register("test_reference", eager_mask)


def reference_logits(model, inputs, masks, base):
    ad = get_adapter(model)
    groups = ad.token_groups(inputs["input_ids"], inputs.get("attention_mask"))
    _REF.update(img=groups["image"], after=groups["after_image"], base=base,
                ordinal={ad.model_layer(i): i for i in range(ad.num_layers)})
    cfgs = {id(m.config): m.config for m in ad.attention}.values()
    saved = [(c, c._attn_implementation) for c in cfgs]
    try:
        for c, _ in saved:
            c._attn_implementation_internal = "test_reference"
        out = []
        with torch.no_grad():
            for m in masks:
                _REF["masks"] = m[None]
                out.append(model(**inputs).logits[0, -1].float())
        return torch.stack(out).cpu()  # on the host, as the engine's results
    finally:
        for c, impl in saved:
            c._attn_implementation_internal = impl


def low_precision(model, inputs, dtype):
    m = copy.deepcopy(model).to(dtype)  # a model of its own: its adapter is made anew
    return m, {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}


def check_contract(model, inputs, dtype, n_masks=6):
    ad = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(n_masks, ad.num_layers, ad.num_heads, generator=g) < 0.3
    masks[0] = False
    base = mean_like_baseline(model, inputs)
    truth = reference_logits(model, inputs, masks, base)
    assert (truth - naive_logits(model, None, inputs, masks, base)).abs().max() < 1e-4  # fp32 paths agree
    lp, lp_inputs = low_precision(model, inputs, dtype)
    ref_err = (reference_logits(lp, lp_inputs, masks, base) - truth).abs().max().item()
    budget = 1.5 * ref_err + 1e-3
    got = {"fast": AblationRunner(lp, None, base, fast=True).prepare(inputs=lp_inputs)(masks)}  # with its fused kernel where one serves
    got["fast, unfused"] = AblationRunner(lp, None, base, fast=True, fused=False).prepare(inputs=lp_inputs)(masks)
    got["naive"] = naive_logits(lp, None, lp_inputs, masks, base)
    errs = {path: (logits - truth).abs().max().item() for path, logits in got.items()}
    assert all(e <= budget for e in errs.values()), (errs, ref_err, budget)
    return errs, ref_err, budget


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_default_model_low_precision(default_model, dtype):
    model, proc = default_model
    from headsteer.ask import default_image

    inputs = get_adapter(model, proc).encode([default_image()], ["what shape is in the image?"])
    check_contract(model, inputs, dtype)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3", "mistral3", "llama4", "qwen3_5", "lfm2_vl"])
def test_tiny_families_bf16(family):
    model, inputs = tiny(family, batch=1)
    check_contract(model, inputs, torch.bfloat16)
