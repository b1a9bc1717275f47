"""The intervention layer on a tiny random model of every supported family."""
import pytest
import torch

from headsteer import Knockout, Spec, get_adapter, intervene
from headsteer.baseline import ZeroBaseline, TensorBaseline
from tiny_models import BUILDERS, HYBRID, MHA, VOCAB, alone_row, other_pixels, tiny

FAMILIES = sorted(BUILDERS)
# where attention is the only route from image to text (hybrid stacks also mix tokens in their
# recurrent/convolution layers, which have no heads: tests/test_families.py checks them otherwise)
ATTENTION_ONLY = sorted(set(BUILDERS) - HYBRID)
GQA_FAMILIES = sorted(set(BUILDERS) - MHA)
# BLIP-2 / InstructBLIP generate through their language model's own generate, never the composite
# forward where headsteer reads the token positions: they are given their groups (Spec(groups=...))
OWN_GENERATE = {"blip-2", "instructblip"}


def last_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def assert_restored(model, before):
    """No session, weights as ``before`` (a state-dict copy), no pre-hooks left behind."""
    assert not any(k.startswith("_headsteer") for m in model.modules() for k in m.__dict__)  # nothing left on any module
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks for m in model.modules())


def mean_like_baseline(model, inputs):
    """A non-trivial baseline: the K/V of another image (exercises the replacement path)."""
    ad = get_adapter(model)
    n = int(ad.image_mask(inputs["input_ids"])[0].sum())
    g = torch.Generator().manual_seed(3)
    k = torch.randn(ad.num_layers, ad.num_kv_heads, n, ad.head_dim, generator=g)
    return TensorBaseline(k, torch.randn(k.shape, generator=g), "test")


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_is_identical_and_model_restored(family):
    model, inputs = tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config.get_text_config()._attn_implementation
    with torch.no_grad():
        ref = model(**inputs).logits
        with intervene(model, Spec()):
            out = model(**inputs).logits
        with intervene(model, head_scale=torch.ones(2, 4)):
            scaled = model(**inputs).logits
    assert torch.equal(ref, out)
    assert torch.equal(ref, scaled)
    assert model.config.get_text_config()._attn_implementation == impl
    assert_restored(model, before)


@pytest.mark.parametrize("family", ATTENTION_ONLY)
@pytest.mark.parametrize("kind", ["zero", "tensor"])
def test_ablating_all_heads_removes_image_influence(family, kind):
    model, inputs = tiny(family)
    other = other_pixels(inputs)
    assert (last_logits(model, inputs) - last_logits(model, other)).abs().max() > 1e-4  # the image matters
    ad = get_adapter(model)
    base = ZeroBaseline(ad.num_kv_heads, ad.head_dim) if kind == "zero" else mean_like_baseline(model, inputs)
    with intervene(model, ablate="*", baseline=base):
        a, b = last_logits(model, inputs), last_logits(model, other)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ATTENTION_ONLY)
def test_knockout_image_to_text_in_all_layers_removes_image_influence(family):
    model, inputs = tiny(family)
    with intervene(model, knockouts=[Knockout("image", "after_image")]):
        a, b = last_logits(model, inputs), last_logits(model, other_pixels(inputs))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3", "idefics3"])
def test_knockout_with_empty_group_changes_nothing(family):
    model, inputs = tiny(family)
    ref = last_logits(model, inputs)
    empty = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    with intervene(model, knockouts=[Knockout(empty, "last")]):
        out = last_logits(model, inputs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def head_outputs(model, inputs, layer, spec=None):
    ad = get_adapter(model)
    got = {}
    h = ad.out_proj(layer).register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].detach().clone()))
    try:
        if spec is None:
            model(**inputs)
        else:
            with intervene(model, spec):
                model(**inputs)
    finally:
        h.remove()
    B, T, _ = got["x"].shape
    return got["x"].view(B, T, ad.num_heads, ad.head_dim)


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_gqa_ablation_is_per_query_head(family):
    model, inputs = tiny(family)
    ad = get_adapter(model)
    assert ad.num_kv_heads < ad.num_heads
    base = mean_like_baseline(model, inputs)
    with torch.no_grad():
        ref = head_outputs(model, inputs, 1)
        out = head_outputs(model, inputs, 1, Spec(ablate="L1H0", baseline=base))
    last = slice(-3, None)
    # head 1 shares head 0's KV head: it must not move; head 0 must.
    torch.testing.assert_close(out[:, last, 1], ref[:, last, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, last, 2:], ref[:, last, 2:], atol=1e-5, rtol=1e-5)
    assert (out[:, last, 0] - ref[:, last, 0]).abs().max() > 1e-3


# not PaliGemma: its image positions attend to the prompt after them (prefix-LM), so they change
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "smolvlm", "gemma3"])
def test_image_positions_are_untouched_by_ablation(family):
    model, inputs = tiny(family)
    ad = get_adapter(model)
    img = ad.image_mask(inputs["input_ids"])
    with torch.no_grad():
        ref = model(**inputs).logits
        with intervene(model, ablate="*", baseline=mean_like_baseline(model, inputs)):
            out = model(**inputs).logits
    torch.testing.assert_close(out[img], ref[img], atol=1e-5, rtol=1e-5)
    assert (out[:, -1] - ref[:, -1]).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_per_example_masks_and_left_padding(family):
    """Each batch element gets its own head mask; results equal running it alone, unpadded."""
    model, inputs = tiny(family, batch=3)
    ad = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, ad.num_layers, ad.num_heads, generator=g) < 0.5
    base = mean_like_baseline(model, inputs)
    with intervene(model, ablate=masks, baseline=base):
        batched = last_logits(model, inputs)
    for b in range(3):
        single = alone_row(family, inputs, b)
        with intervene(model, ablate=masks[b : b + 1], baseline=base):
            alone = last_logits(model, single)
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("what", ["ablate", "image_attn", "steer"])
def test_interventions_hold_during_cached_generation(family, what):
    """Logits of a cached decoding step equal a full uncached forward over the same tokens (a
    left-padded batch of two, three new tokens: sliding windows, chunks and 3D positions included)."""
    model, inputs = tiny(family, batch=2)
    ad = get_adapter(model)
    if what == "ablate":
        spec = dict(ablate="L0H1,L1H0-2", baseline=mean_like_baseline(model, inputs))
    elif what == "image_attn":
        spec = dict(image_attn=torch.full((ad.num_layers, ad.num_heads), 3.0))
    else:
        spec = dict(head_scale=torch.full((ad.num_layers, ad.num_heads), 1.5), head_add=torch.randn(ad.num_layers, ad.num_heads, ad.head_dim))
    if family in OWN_GENERATE:
        spec["groups"] = ad.token_groups(inputs["input_ids"], inputs["attention_mask"])
    with torch.no_grad(), intervene(model, **spec):
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             suppress_tokens=list(range(80, VOCAB)),  # no generated token may look like an image token
                             pad_token_id=0)
        seq = gen.sequences
        full = dict(inputs)
        full["input_ids"] = seq[:, :-1]
        full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(2, seq.shape[1] - 1 - inputs["input_ids"].shape[1], dtype=torch.long)], 1)
        if "mm_token_type_ids" in full:
            full["mm_token_type_ids"] = (full["input_ids"] == 90).long()
        uncached = model(**full, use_cache=False).logits[:, -1]
    torch.testing.assert_close(gen.logits[-1], uncached, atol=1e-4, rtol=1e-4)
    plain = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert (plain.logits[0] - gen.logits[0]).abs().max() > 1e-4  # the intervention did something


def test_image_attention_scaling_zero_equals_knockout():
    model, inputs = tiny("llava")
    ad = get_adapter(model)
    with intervene(model, image_attn=torch.zeros(ad.num_layers, ad.num_heads)):
        a = last_logits(model, inputs)
    with intervene(model, knockouts=[Knockout("image", "after_image")]):
        b = last_logits(model, inputs)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_head_scale_zero_equals_zeroing_o_proj_columns():
    model, inputs = tiny("llava")
    ad = get_adapter(model)
    scale = torch.ones(ad.num_layers, ad.num_heads)
    scale[1, 2] = 0.0
    with intervene(model, head_scale=scale):
        a = last_logits(model, inputs)
    w = ad.out_proj(1).weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[:, 2 * ad.head_dim : 3 * ad.head_dim] = 0
    b = last_logits(model, inputs)
    with torch.no_grad():
        w.copy_(saved)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_nested_contexts_compose():
    model, inputs = tiny("llava")
    ad = get_adapter(model)
    s1 = torch.full((ad.num_layers, ad.num_heads), 2.0)
    s2 = torch.full((ad.num_layers, ad.num_heads), 0.5)
    ref = last_logits(model, inputs)
    with intervene(model, head_scale=s1):
        with intervene(model, head_scale=s2):
            both = last_logits(model, inputs)
        only1 = last_logits(model, inputs)
    torch.testing.assert_close(both, ref, atol=1e-5, rtol=1e-5)
    assert (only1 - ref).abs().max() > 1e-4
    assert not any(k.startswith("_headsteer") for m in model.modules() for k in m.__dict__)  # nothing left on any module
