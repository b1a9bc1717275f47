"""The intervention lifecycle: exception-safe, nests, never mutates the user's Spec, and the fast
path's prefix lives only as long as its own context."""
import pytest
import torch

from headsteer import Spec, get_adapter, intervene
from headsteer.attribution.engine import AblationRunner
from headsteer.baseline import ZeroBaseline
from test_intervene import last_logits, mean_like_baseline
from tiny_models import tiny


def _clean(model):
    impl = model.config.get_text_config()._attn_implementation
    assert not impl.startswith("headsteer_"), impl
    assert not any(k.startswith("_headsteer") for m in model.modules() for k in m.__dict__)  # nothing left on any module
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert not any(hasattr(m, "_headsteer") for m in model.modules())


def test_error_while_entering_restores_the_model_and_keeps_the_real_error(monkeypatch):
    model, inputs = tiny("llava")
    ad = get_adapter(model)

    def broken(layer):
        raise RuntimeError("no out_proj here")

    monkeypatch.setattr(ad, "out_proj", broken)
    with pytest.raises(RuntimeError, match="no out_proj here"):
        with intervene(model, head_scale=torch.ones(ad.num_layers, ad.num_heads)):
            pass
    monkeypatch.undo()
    _clean(model)


def test_error_inside_the_block_restores_the_model():
    model, inputs = tiny("llava")
    ref = last_logits(model, inputs)
    with pytest.raises(KeyError):
        with intervene(model, ablate="*", baseline=mean_like_baseline(model, inputs)):
            with intervene(model, head_scale=torch.zeros(2, 4)):
                raise KeyError("boom")
    _clean(model)
    torch.testing.assert_close(last_logits(model, inputs), ref, atol=0, rtol=0)


def test_user_spec_is_not_mutated_and_can_be_reused():
    model, inputs = tiny("llava")
    ad = get_adapter(model)
    factors = [[2.0] * ad.num_heads for _ in range(ad.num_layers)]
    spec = Spec(ablate="L1H0", baseline=mean_like_baseline(model, inputs), image_attn=factors)
    before = dict(vars(spec))
    with intervene(model, spec):
        a = last_logits(model, inputs)
    assert dict(vars(spec)).keys() == before.keys()
    assert spec.image_attn is factors and spec.ablate == "L1H0"
    with intervene(model, spec):
        b = last_logits(model, inputs)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_fast_path_inside_an_outer_context_leaves_no_prefix_behind():
    model, inputs = tiny("llava", batch=1)
    ad = get_adapter(model)
    ref = last_logits(model, inputs)
    masks = torch.zeros(3, ad.num_layers, ad.num_heads, dtype=torch.bool)
    masks[1, 0] = True
    with intervene(model, Spec()):
        AblationRunner(model, None, ZeroBaseline(ad.num_kv_heads, ad.head_dim), fast=True).prepare(inputs=inputs)(masks)
        after = last_logits(model, inputs)
    torch.testing.assert_close(after, ref, atol=1e-6, rtol=0)
    _clean(model)


def test_fast_path_under_an_outer_edit_sees_the_edit():
    """An outer head-scale edit applies to the prefix and the suffix alike: fast == naive."""
    from headsteer.attribution.engine import naive_logits

    model, inputs = tiny("llava", batch=1)
    ad = get_adapter(model)
    scale = torch.full((ad.num_layers, ad.num_heads), 1.7)
    masks = torch.rand(4, ad.num_layers, ad.num_heads, generator=torch.Generator().manual_seed(0)) < 0.5
    base = mean_like_baseline(model, inputs)
    with intervene(model, head_scale=scale):
        fast = AblationRunner(model, None, base, fast=True).prepare(inputs=inputs)(masks)
        naive = naive_logits(model, None, inputs, masks, base)
    torch.testing.assert_close(fast, naive, atol=1e-4, rtol=0)
    _clean(model)


def test_two_models_do_not_share_state():
    m1, inputs = tiny("llava", batch=1)
    m2, _ = tiny("llava", batch=1, seed=1)
    ref2 = last_logits(m2, inputs)
    with intervene(m1, head_scale=torch.zeros(2, 4)):
        torch.testing.assert_close(last_logits(m2, inputs), ref2, atol=0, rtol=0)
    _clean(m1)
    _clean(m2)


def test_engine_returns_cpu_float():
    model, inputs = tiny("llava", batch=1)
    ad = get_adapter(model)
    out = AblationRunner(model, None, ZeroBaseline(ad.num_kv_heads, ad.head_dim), fast=True).prepare(inputs=inputs)(
        torch.zeros(2, ad.num_layers, ad.num_heads, dtype=torch.bool))
    assert out.device.type == "cpu" and out.dtype == torch.float32
