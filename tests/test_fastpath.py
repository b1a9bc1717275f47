"""The fast attribution engine equals the naive path (a full forward per mask) on every family."""
import pytest
import torch
from test_intervene import mean_like_baseline
from tiny_models import BUILDERS, HYBRID, SEQ_KEYS, tiny

from headsteer import HeadsteerError, get_adapter
from headsteer.attribution.engine import NO_FAST_PATH, SuffixRunner, fast_path_refusal, naive_logits
from headsteer.baseline import ZeroBaseline


@pytest.mark.parametrize("family", sorted(set(BUILDERS) - set(NO_FAST_PATH) - HYBRID))  # hybrid: below
def test_fast_equals_naive_for_random_masks(family):
    model, inputs = tiny(family, batch=1)
    ad = get_adapter(model)
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(9, ad.num_layers, ad.num_heads, generator=g) < 0.4
    masks[0], masks[1] = False, True
    for base in (mean_like_baseline(model, inputs), ZeroBaseline(ad.num_kv_heads, ad.head_dim)):
        fast = SuffixRunner(model, None, None, None, base, inputs=inputs, chunk=4)(masks)
        naive = naive_logits(model, None, inputs, masks, base)
        torch.testing.assert_close(fast, naive, atol=1e-4, rtol=0)
        assert (naive[0] - naive[1]).abs().max() > 1e-3  # the masks matter


def test_prefix_lm_family_refuses_fast_path():
    model, inputs = tiny("paligemma", batch=1)
    with pytest.raises(HeadsteerError, match="no fast path"):
        SuffixRunner(model, None, None, None, ZeroBaseline(2, 8), inputs=inputs)


def _prefix_states(runner):
    """Every recurrent/convolution state the runner's prefix holds."""
    return [t for lay in runner.prefix.cache.layers for states in (getattr(lay, "conv_states", {}), getattr(lay, "recurrent_states", {}))
            for t in states.values() if t is not None]


@pytest.mark.parametrize("family", sorted(HYBRID))
def test_hybrid_stack_fast_equals_naive(family):
    """The recurrent/convolution layers' state at the end of the prefix is carried like the prefix
    K/V: chunks of different sizes (3, 3, 1) read it, none writes it."""
    model, inputs = tiny(family, batch=1)
    ad = get_adapter(model)
    assert ad.hybrid and ad.num_layers == 2 and ad.model_layer(1) == 2  # heads only in the attention layers
    assert fast_path_refusal(ad, inputs["input_ids"]) is None
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(7, ad.num_layers, ad.num_heads, generator=g) < 0.4
    masks[:4] = False
    masks[1], masks[2, 0], masks[3, 1] = True, True, True  # all heads; one attention layer at a time
    for base in (mean_like_baseline(model, inputs), ZeroBaseline(ad.num_kv_heads, ad.head_dim)):
        runner = SuffixRunner(model, None, None, None, base, inputs=inputs, chunk=3)
        states = [t.clone() for t in _prefix_states(runner)]
        assert states  # the prefix carries recurrent state
        fast = runner(masks)
        naive = naive_logits(model, None, inputs, masks, base)
        torch.testing.assert_close(fast, naive, atol=1e-4, rtol=0)
        for m in (1, 2, 3):  # the masks matter, in each attention layer (attention ordinal vs model layer index)
            assert (naive[0] - naive[m]).abs().max() > 1e-3
        torch.testing.assert_close(runner(masks), fast, atol=0, rtol=0)
        for before, after in zip(states, _prefix_states(runner), strict=True):
            torch.testing.assert_close(after, before, atol=0, rtol=0)
    # a one-token suffix: the models' single-token branch (a decode kernel that writes its state)
    P = int(ad.image_mask(inputs["input_ids"])[0].nonzero().max()) + 1
    short = {k: v[:, : P + 1] if k in SEQ_KEYS else v for k, v in inputs.items()}
    runner = SuffixRunner(model, None, None, None, base, inputs=short, chunk=3)
    torch.testing.assert_close(runner(masks), naive_logits(model, None, short, masks, base), atol=1e-4, rtol=0)


def test_reduce_on_the_device_equals_reducing_the_host_logits():
    from headsteer.attribution.regression import statistic

    model, inputs = tiny("llava", batch=1)
    ad = get_adapter(model)
    masks = torch.rand(7, ad.num_layers, ad.num_heads, generator=torch.Generator().manual_seed(3)) < 0.4
    base = ZeroBaseline(ad.num_kv_heads, ad.head_dim)
    runner = SuffixRunner(model, None, None, None, base, inputs=inputs, chunk=3)
    full = runner(masks)

    def reduce(logits):
        return statistic(logits, 5, "margin", [5, 7, 9])

    torch.testing.assert_close(runner(masks, reduce), statistic(full, 5, "margin", [5, 7, 9]), atol=0, rtol=0)
    naive = naive_logits(model, None, inputs, masks, base)
    torch.testing.assert_close(naive_logits(model, None, inputs, masks, base, reduce), reduce(naive), atol=0, rtol=0)


@pytest.mark.parametrize("scale", [1e-3, 300.0])
def test_ablated_rows_stay_exact_when_one_block_dominates_the_softmax(scale):
    """Baseline keys far below or far above the other scores: the ablated rows' softmax must not
    underflow to 0/0 or overflow (each block of the split softmax has its own row maximum)."""
    from headsteer.baseline import TensorBaseline

    model, inputs = tiny("llava", batch=1)
    ad = get_adapter(model)
    base = mean_like_baseline(model, inputs)
    base = TensorBaseline(base.keys * scale, base.values, "test")
    masks = torch.rand(6, ad.num_layers, ad.num_heads, generator=torch.Generator().manual_seed(2)) < 0.5
    fast = SuffixRunner(model, None, None, None, base, inputs=inputs, chunk=4)(masks)
    naive = naive_logits(model, None, inputs, masks, base)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, naive, atol=1e-4, rtol=0)


def test_chunk_size_counts_the_recurrent_state_of_hybrid_stacks():
    from headsteer.attribution.engine import _state_bytes

    model, inputs = tiny("qwen3_5", batch=1)
    runner = SuffixRunner(model, None, None, None, ZeroBaseline(get_adapter(model).num_kv_heads, get_adapter(model).head_dim), inputs=inputs)
    assert _state_bytes(runner.prefix.cache) > 0  # measured on the prefix cache: the gated delta-net's state
    model, inputs = tiny("llava", batch=1)
    runner = SuffixRunner(model, None, None, None, ZeroBaseline(get_adapter(model).num_kv_heads, get_adapter(model).head_dim), inputs=inputs)
    assert _state_bytes(runner.prefix.cache) == 0
