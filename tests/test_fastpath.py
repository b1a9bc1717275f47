"""The fast attribution engine equals the naive path (a full forward per mask) on every family."""
import pytest
import torch

from headsteer import HeadsteerError, get_adapter
from headsteer.attribution.engine import NO_FAST_PATH, SuffixRunner, ablated_logits, naive_logits
from headsteer.baseline import ZeroBaseline
from test_intervene import mean_like_baseline
from tiny_models import BUILDERS, HYBRID, tiny


@pytest.mark.parametrize("family", sorted(set(BUILDERS) - set(NO_FAST_PATH)))
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


@pytest.mark.parametrize("family", sorted(HYBRID))
def test_hybrid_stack_takes_the_naive_path(family):
    model, inputs = tiny(family, batch=1)
    ad = get_adapter(model)
    assert ad.hybrid and ad.num_layers == 2 and ad.model_layer(1) == 2  # heads only in the attention layers
    base = ZeroBaseline(ad.num_kv_heads, ad.head_dim)
    with pytest.raises(HeadsteerError, match="recurrent/convolution layers' state"):
        SuffixRunner(model, None, None, None, base, inputs=inputs)
    masks = torch.zeros(2, ad.num_layers, ad.num_heads, dtype=torch.bool)
    masks[1] = True
    naive = naive_logits(model, None, inputs, masks, base)
    assert (naive[0] - naive[1]).abs().max() > 1e-3


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
