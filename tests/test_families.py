"""Family-specific layouts beyond the one-image prompts of tiny_models: video frames as image tokens,
hybrid stacks, Llama 4's chunked attention and its transformers 5.24 work-around, and the family
registry (every model type transformers maps to image-text-to-text is either supported or refused
with its reason, and the README lists them)."""
import re
from pathlib import Path

import pytest
import torch
import transformers as tf
from packaging.version import Version
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as MAPPING

from headsteer import HeadsteerError, get_adapter, intervene
from headsteer.families import FAMILIES, REFUSED, families_markdown, since
from headsteer.attribution.engine import AblationRunner, naive_logits
from headsteer.baseline import TensorBaseline, ZeroBaseline
from headsteer.compat import reads_language_model_image_outputs
from test_fastpath import assert_fast_equals_naive
from test_intervene import last_logits, mean_like_baseline
from tiny_models import BUILDERS, HYBRID, IMG, VOCAB, _ids, _unlimited_ocr, alone_row, other_pixels, tiny

VIDEO = 89  # video token id of the tiny video families
VIDEO_TOKENS = {"video_llava": 34, "llava_next_video": 8}  # 2 frames of 32x32


def video_inputs(family, batch=2, seed=0):
    model, _ = tiny(family, batch=batch)
    ids, am = _ids(VIDEO_TOKENS[family], batch)
    ids[ids == IMG] = VIDEO
    g = torch.Generator().manual_seed(seed)
    return model, dict(input_ids=ids, attention_mask=am, pixel_values_videos=torch.randn(batch, 2, 3, 32, 32, generator=g))


@pytest.mark.parametrize("family", sorted(VIDEO_TOKENS))
@pytest.mark.parametrize("kind", ["zero", "tensor"])
def test_video_frames_are_image_tokens(family, kind):
    model, inputs = video_inputs(family)
    _, other = video_inputs(family, seed=1)
    ad = get_adapter(model)
    assert int(ad.image_mask(inputs["input_ids"])[0].sum()) == VIDEO_TOKENS[family]
    assert (last_logits(model, inputs) - last_logits(model, other)).abs().max() > 1e-4
    base = ZeroBaseline(ad.num_kv_heads, ad.head_dim) if kind == "zero" else mean_like_baseline(model, inputs)
    with intervene(model, ablate="*", baseline=base):
        torch.testing.assert_close(last_logits(model, inputs), last_logits(model, other), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(VIDEO_TOKENS))
def test_video_fast_equals_naive(family):
    assert_fast_equals_naive(*video_inputs(family, batch=1), n=4, seed=0, rate=0.5)


@pytest.mark.parametrize("family", sorted(HYBRID))
def test_hybrid_ablation_acts_on_attention_layers_only(family):
    """In a hybrid stack image information also reaches the text through recurrent/convolution
    layers (no heads there), so all-head ablation cannot make the answer image-independent. What
    holds: ablating every head with the prompt's own image K/V as the baseline changes nothing,
    a zero baseline changes the answer, image positions are untouched, and heads are numbered by
    attention layer (HeadSet L1 = the second attention layer)."""
    model, inputs = tiny(family, batch=1)
    ad = get_adapter(model)
    img = ad.image_mask(inputs["input_ids"])[0]
    cap = {}
    with torch.no_grad(), intervene(model, capture=cap):
        ref = model(**inputs).logits
    assert sorted(cap) == [0, 1]
    own = TensorBaseline(torch.stack([cap[l][0][0][:, img] for l in range(2)]), torch.stack([cap[l][1][0][:, img] for l in range(2)]),
                         "own")
    with torch.no_grad():
        with intervene(model, ablate="*", baseline=own):
            same = model(**inputs).logits
        with intervene(model, ablate="L1H*", baseline=ZeroBaseline(ad.num_kv_heads, ad.head_dim)):
            zero = model(**inputs).logits
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zero[0, img], ref[0, img], atol=1e-5, rtol=1e-5)
    assert (zero[0, -1] - ref[0, -1]).abs().max() > 1e-4


def test_unlimited_ocr_ablation_holds_past_the_reference_sliding_window():
    """Unlimited-OCR's cache keeps every prompt key and the last ``sliding_window`` generated ones, so
    past the window its keys are no longer one run of positions (the image keys stay). Window 2, 5 new
    tokens (the last two past it), one unpadded prompt: all-head ablation keeps every step
    image-independent, and ablating with the prompt's own image K/V changes nothing. Past the window
    cached decoding is the model's own semantics, no longer a full forward's. A left-padded batch is
    refused there: transformers 5.24's mask then shows the padding keys to the padded rows (the padded
    row differs from the prompt alone also without headsteer)."""
    torch.manual_seed(0)
    model, batch = _unlimited_ocr(2, window=2)
    model.eval()
    one = alone_row("unlimited_ocr", batch, 0)
    ad = get_adapter(model)
    zero = ZeroBaseline(ad.num_kv_heads, ad.head_dim)

    def generate(inputs, **spec):
        with torch.no_grad(), intervene(model, **spec):
            return model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
                                  suppress_tokens=list(range(80, VOCAB)), pad_token_id=0)

    a, b = generate(one, ablate="*", baseline=zero), generate(other_pixels(one), ablate="*", baseline=zero)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=1e-5, rtol=0)
    with torch.no_grad(), intervene(model, ablate="*", baseline=zero):
        full = model(**one | dict(input_ids=a.sequences[:, :-1], attention_mask=torch.ones_like(a.sequences[:, :-1])), use_cache=False)
    assert (full.logits[:, -1] - a.logits[-1]).abs().max() > 1e-4  # the window dropped generated keys

    img = ad.image_mask(one["input_ids"])[0]
    cap = {}
    with torch.no_grad(), intervene(model, capture=cap):
        model(**one)
    own = TensorBaseline(*(torch.stack([cap[l][i][0][:, img] for l in range(ad.num_layers)]) for i in (0, 1)), "own")
    torch.testing.assert_close(torch.stack(generate(one, ablate="L0H1,L1H0-2", baseline=own).logits),
                               torch.stack(generate(one).logits), atol=1e-5, rtol=1e-5)
    with pytest.raises(HeadsteerError, match="left-padded batch past the sliding window"):
        generate(batch, ablate="*", baseline=zero)


def test_llama4_chunked_layer_ablation_reads_only_the_chunk():
    """Layer 0 attends within chunks of 8 tokens: the text after the image (positions 9-14) shares a
    chunk with the last image token (8) only. Replacing the baseline at the other image ordinals
    changes nothing there, in the naive and the fast path (whose prefix mask hides those columns)."""
    model, inputs = tiny("llama4", batch=1)
    ad = get_adapter(model)
    img = ad.image_mask(inputs["input_ids"])[0]
    assert img.nonzero().flatten().tolist() == [5, 6, 7, 8] and ad.text_config.attention_chunk_size == 8
    cap = {}
    with torch.no_grad(), intervene(model, capture=cap):
        ref = last_logits(model, inputs)
    own = [torch.stack([cap[l][i][0][:, img] for l in range(ad.num_layers)]) for i in (0, 1)]  # [L, Hkv, n, d]

    def replaced(ordinals):
        g = torch.Generator().manual_seed(0)
        k, v = (t.clone() for t in own)
        for t in (k, v):
            t[0][:, ordinals] = torch.randn(t[0][:, ordinals].shape, generator=g)
        return TensorBaseline(k, v, "own, some ordinals replaced")

    masks = torch.zeros(1, ad.num_layers, ad.num_heads, dtype=torch.bool)
    masks[0, 0] = True
    for ordinals, moves in (([0, 1, 2], False), ([3], True)):
        base = replaced(ordinals)
        naive = naive_logits(model, None, inputs, masks, base)
        fast = AblationRunner(model, None, base, fast=True).prepare(inputs=inputs)(masks)
        torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)
        assert ((naive - ref).abs().max() > 1e-4) == moves


def test_llama4_work_around_only_where_needed_added_once_and_keeps_the_output():
    """transformers 5.24's Llama 4 forward reads a field its language model's output lacks; where the
    installed release does that, the adapter gives that output the attribute with one forward hook,
    added once per model, and the output keeps its fields. A release without the bug (5.25) gets no
    hook. Either way a forward of a fresh model runs through."""
    from transformers import Llama4ForConditionalGeneration

    model, inputs = tiny("llama4", batch=1)
    fresh = type(model)(model.config).eval()  # no adapter yet
    needed = reads_language_model_image_outputs(Llama4ForConditionalGeneration)
    get_adapter(fresh)
    get_adapter(fresh)
    assert len(fresh.language_model._forward_hooks) == int(needed)
    with torch.no_grad():
        out = fresh(**inputs)
        lm_out = fresh.language_model(input_ids=inputs["input_ids"])
    assert "image_outputs" not in lm_out  # a key only where transformers defines the field
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    if needed:
        assert "image_outputs" not in out and lm_out.image_outputs is None


def test_llama4_bug_detection_reads_the_forward():
    """The detection looks for the 5.24 expression in the forward, so a fixed release is left alone."""
    class Buggy:
        def forward(self, outputs):
            return outputs.image_outputs

    class Fixed:
        def forward(self, mm):
            return mm.get("image")

    assert reads_language_model_image_outputs(Buggy) and not reads_language_model_image_outputs(Fixed)


def test_every_image_text_to_text_type_is_supported_tested_or_refused_with_a_reason():
    here = set(MAPPING)  # the installed transformers' types; a newer one (``since``) is absent from an older release
    plain = {t for t, f in FAMILIES.items() if f.cross is None}
    assert plain & here == set(BUILDERS)  # every supported family has a tiny model and runs the invariants
    assert not set(FAMILIES) & set(REFUSED)
    newer = {t for t in set(FAMILIES) | set(REFUSED) if since(t) is not None}
    assert (set(FAMILIES) | set(REFUSED)) - here <= newer, "a registry type transformers does not know: a typo?"
    assert all(t not in here for t in newer if Version(tf.__version__) < Version(since(t)))


def test_readme_states_the_count_and_docs_families_is_current():
    """The README's count line matches the registry, and docs/families.md is the registry's own
    rendering (regenerate it with `python -m headsteer.families > docs/families.md`)."""
    root = Path(__file__).parent.parent
    readme = root.joinpath("README.md").read_text()
    section = readme.split("## Supported models", 1)[1].split("\n## ", 1)[0]
    n, total, version = re.match(r"\s*(\d+) of the (\d+) image-text-to-text model types of transformers ([\d.]+)", section).groups()
    assert int(n) == len(FAMILIES)
    if tf.__version__.startswith(version + "."):  # the count is the README's release's
        assert int(total) == len(MAPPING)
    assert root.joinpath("docs", "families.md").read_text() == families_markdown(), "regenerate docs/families.md"
    named = set(re.findall(r"`([a-z0-9_.-]+)`", families_markdown()))  # kosmos-2.5 has a dot
    assert set(FAMILIES) | set(REFUSED) <= named


@pytest.mark.parametrize("mtype, why", [("chameleon", "VQ codes"), ("blip", "cross-attention"), ("florence2", "encoder-decoder"),
                                        ("instructblipvideo", "into its Q-Former"), ("fast_vlm", "timm"), ("pi0", "no answer token"),
                                        ("diffusion_gemma", "block-diffusion"), ("evolla", "protein"), ("kimi_k25", "latent attention"), ("mistral_large4", "indexer"), ("mistral4", "text-only"), ("inkling2", "swa_head_dim"), ("kosmos-2", "image_embeds_position_mask"),
                                        ("bert", "no tested adapter")])
def test_refused_families_say_why_before_weights_load(tmp_path, mtype, why):
    import json

    import headsteer
    from headsteer import HeadsteerError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": mtype}))
    with pytest.raises(HeadsteerError, match=why) as e:
        headsteer.load(tmp_path)  # no weights in the folder: the refusal comes first
    assert "\n" not in str(e.value)
