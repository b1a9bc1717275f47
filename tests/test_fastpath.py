"""The fast attribution engine equals the naive path (a full forward per mask) on every family."""
import pytest
import torch
from test_intervene import mean_like_baseline
from tiny_models import BUILDERS, HYBRID, SEQ_KEYS, tiny

from headsteer import HeadsteerError, fastpath, get_adapter
from headsteer.attention_mask import NEG
from headsteer.attribution.engine import AblationRunner, fast_path_refusal, naive_logits
from headsteer.baseline import ZeroBaseline
from headsteer.families import FAMILIES
from headsteer.fastpath import attend_block, merge

NO_FAST_PATH = {t for t, f in FAMILIES.items() if f.no_fast_path is not None}


def assert_fast_equals_naive(model, inputs, n, seed, rate, fused=True):
    """The fast path (batches of 4 masks) equals the naive path under the mean-like baseline."""
    ad = get_adapter(model)
    masks = torch.rand(n, ad.num_layers, ad.num_heads, generator=torch.Generator().manual_seed(seed)) < rate
    base = mean_like_baseline(model, inputs)
    fast = AblationRunner(model, None, base, fast=True, chunk=4, fused=fused).prepare(inputs=inputs)(masks)
    torch.testing.assert_close(fast, naive_logits(model, None, inputs, masks, base), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(set(BUILDERS) - set(NO_FAST_PATH) - HYBRID))  # hybrid: below
def test_fast_equals_naive_for_random_masks(family):
    model, inputs = tiny(family, batch=1)
    ad = get_adapter(model)
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(9, ad.num_layers, ad.num_heads, generator=g) < 0.4
    masks[0], masks[1] = False, True
    for base in (mean_like_baseline(model, inputs), ZeroBaseline(ad.num_kv_heads, ad.head_dim)):
        fast = AblationRunner(model, None, base, fast=True, chunk=4).prepare(inputs=inputs)(masks)
        naive = naive_logits(model, None, inputs, masks, base)
        torch.testing.assert_close(fast, naive, atol=1e-4, rtol=0)
        assert (naive[0] - naive[1]).abs().max() > 1e-3  # the masks matter


def test_prefix_lm_family_refuses_fast_path():
    model, inputs = tiny("paligemma", batch=1)
    with pytest.raises(HeadsteerError, match="no fast path"):
        AblationRunner(model, None, ZeroBaseline(2, 8), fast=True).prepare(inputs=inputs)


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
        runner = AblationRunner(model, None, base, fast=True, chunk=3).prepare(inputs=inputs)
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
    runner = AblationRunner(model, None, base, fast=True, chunk=3).prepare(inputs=short)
    torch.testing.assert_close(runner(masks), naive_logits(model, None, short, masks, base), atol=1e-4, rtol=0)


def test_reduce_on_the_device_equals_reducing_the_host_logits():
    from headsteer.attribution.regression import statistic

    model, inputs = tiny("llava", batch=1)
    ad = get_adapter(model)
    masks = torch.rand(7, ad.num_layers, ad.num_heads, generator=torch.Generator().manual_seed(3)) < 0.4
    base = ZeroBaseline(ad.num_kv_heads, ad.head_dim)
    runner = AblationRunner(model, None, base, fast=True, chunk=3).prepare(inputs=inputs)
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
    fast = AblationRunner(model, None, base, fast=True, chunk=4).prepare(inputs=inputs)(masks)
    naive = naive_logits(model, None, inputs, masks, base)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, naive, atol=1e-4, rtol=0)


def test_chunk_size_counts_the_recurrent_state_of_hybrid_stacks():
    from headsteer.attribution.engine import _state_bytes

    model, inputs = tiny("qwen3_5", batch=1)
    runner = AblationRunner(model, None, ZeroBaseline(get_adapter(model).num_kv_heads, get_adapter(model).head_dim), fast=True).prepare(inputs=inputs)
    assert _state_bytes(runner.prefix.cache) > 0  # measured on the prefix cache: the gated delta-net's state
    model, inputs = tiny("llava", batch=1)
    runner = AblationRunner(model, None, ZeroBaseline(get_adapter(model).num_kv_heads, get_adapter(model).head_dim), fast=True).prepare(inputs=inputs)
    assert _state_bytes(runner.prefix.cache) == 0


def _one_softmax(q, k, v, scaling, softcap=None, bias=None):
    s = q.double() @ k.double().transpose(1, 2) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = (s.view(s.shape[0], -1, bias.shape[-2], s.shape[-1]) + bias.double()).view_as(s)
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1, keepdim=True)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", ["plain", "softcap", "bias"])
def test_blocks_merged_by_their_log_sum_exps_equal_one_softmax_over_all_keys(fused, dtype, extra):
    """The fast path attends each block of keys on its own (a fused kernel where one serves it) and
    merges them: that must be the softmax over the union of the keys, with its log-sum-exp."""
    g = torch.Generator().manual_seed(0)
    H, R, d, s = 2, 12, 16, 3
    q = torch.randn(H, R, d, generator=g).to(dtype)
    k1, v1, k2, v2 = (torch.randn(H, n, d, generator=g).to(dtype) for n in (5, 5, 7, 7))
    k2 = k2 * 4  # one block's scores well above the other's
    softcap = 2.0 if extra == "softcap" else None
    b1, b2 = ((torch.where(torch.rand(s, n, generator=g) < 0.3, NEG, 0.0) for n in (5, 7)) if extra == "bias"
              else (None, None))
    out, lse = merge(attend_block(q, k1, v1, 0.25, softcap, b1, fused=fused), attend_block(q, k2, v2, 0.25, softcap, b2, fused=fused))
    ref, ref_lse = _one_softmax(q, torch.cat([k1, k2], 1), torch.cat([v1, v2], 1), 0.25, softcap,
                                None if b1 is None else torch.cat([b1, b2], 1))
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the fused kernel rounds its block outputs to bf16
    torch.testing.assert_close(out, ref.float(), atol=tol, rtol=0)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "gemma3"])
def test_fast_path_without_the_fused_kernel_equals_naive(family):
    """Where no fused kernel serves (fp32 on CUDA, cards before Ampere, MPS) every block runs in
    headsteer's own fp32 arithmetic: the same results (Gemma 3: its sliding window hides prefix keys)."""
    assert_fast_equals_naive(*tiny(family, batch=1), n=6, seed=3, rate=0.4, fused=False)


def test_the_model_mask_is_read_once_per_batch_not_once_per_layer(monkeypatch):
    """Whether the prefix block of the mask hides anything is read on the host: once per layer it
    would stall a GPU's queue at every layer. Layers of one type share the mask the model made."""
    model, inputs = tiny("llava", batch=1)
    ad = get_adapter(model)
    assert ad.num_layers >= 2
    runner = AblationRunner(model, None, ZeroBaseline(ad.num_kv_heads, ad.head_dim), fast=True, chunk=4).prepare(inputs=inputs)
    calls = []
    real = fastpath.additive_mask
    monkeypatch.setattr(fastpath, "additive_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    runner(torch.rand(8, ad.num_layers, ad.num_heads) < 0.4)
    assert len(calls) == 2  # two batches of 4, one mask type


def test_a_fused_kernel_that_fails_falls_back_to_the_fp32_blocks_once(monkeypatch):
    """A card or build whose kernel refuses a block (ROCm, an old build): one warning, the same results."""
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setitem(fastpath._FLASH, "cpu", broken)
    model, inputs = tiny("llava", batch=1)
    with pytest.warns(UserWarning, match="fused attention kernel failed on cpu"):
        assert_fast_equals_naive(model, inputs, n=6, seed=4, rate=0.4)
    assert len(calls) == 1
