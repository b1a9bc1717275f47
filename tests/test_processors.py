"""Tiny models of many families with their real transformers processor classes (a word-level
tokenizer holding the family's special tokens, a Pil image processor sized for the tiny vision tower,
a small chat template), so the token layouts, chat templates and role-token detection that real
checkpoints produce go through ``Adapter.encode`` — tests/tiny_models.py feeds hand-made input_ids.
Each family's processor is a ``ProcessorSpec`` in one of the tests/processors_*.py modules."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

import processors_core
import processors_glm
import processors_idefics
import processors_llava
import processors_more
import processors_ocr
import processors_qwen
from headsteer import HeadsteerError, get_adapter, intervene
from headsteer.attribution.engine import AblationRunner, ablated_logits, fast_path_refusal, naive_logits
from headsteer.baseline import TensorBaseline, ZeroBaseline
from tiny_models import BUILDERS, IMG, tiny
from tiny_processors import Q_LONG, Q_SHORT, build, feature_counts, image, last_logits, make_tokenizer, multi_image_inputs, random_baseline

SPECS = {}
for _module in (processors_core, processors_llava, processors_qwen, processors_glm, processors_idefics, processors_ocr,
                processors_more):
    assert not set(SPECS) & set(_module.SPECS), "a family has two processor specs"
    SPECS.update(_module.SPECS)
SPECS = {k: v for k, v in SPECS.items() if k in BUILDERS}  # a family newer than the installed transformers is not built


@pytest.fixture(scope="module", params=sorted(SPECS))
def built(request):
    spec = SPECS[request.param]
    model, proc = build(request.param, spec)
    return request.param, spec, model, get_adapter(model, proc)


def test_image_mask_is_exactly_the_processor_image_tokens(built):
    family, spec, model, ad = built
    wide, square = spec.sizes
    inputs = ad.encode([image(0, wide), image(1, square)], [Q_LONG, Q_SHORT])
    ids, tok = inputs["input_ids"], ad.processor.tokenizer
    mask = ad.image_mask(ids)
    assert torch.equal(mask, ids == IMG)  # the config's image token, which the processor expanded
    assert mask.sum(1).tolist() == (spec.feature_counts or feature_counts)(model, inputs)  # one image per prompt here
    present = set(tok.convert_ids_to_tokens(ids[~mask].tolist()))
    assert set(spec.around) <= present  # the layout has them, and they are not image tokens
    if spec.tiles:  # the wide and the square image get different tiles
        assert mask[0].sum() != mask[1].sum()


def test_token_groups_follow_the_chat_template(built):
    family, spec, model, ad = built
    inputs = ad.encode([image(0), image(1)], [Q_LONG, Q_SHORT])
    ids, tok = inputs["input_ids"], ad.processor.tokenizer
    groups = ad.token_groups(ids, inputs["attention_mask"])
    role, last = spec.role
    assert ad.num_role_tokens() == len(role) + 1
    for b, q in enumerate([Q_LONG, Q_SHORT]):
        names = lambda g: tok.convert_ids_to_tokens(ids[b][groups[g][b]].tolist())  # noqa: E731
        assert names("role") == role
        assert names("last") == [last] and groups["last"][b, -1]
        before, after = spec.question_wrap
        words = q.split()[:-1] if spec.question_ends_prompt else q.split()
        assert names("question") == before + words + after
        assert not (groups["question"] & groups["image"]).any()


def own_image_kv(model, ad, inputs):
    """The prompt's own K/V at its image positions, as a baseline."""
    cap = {}
    with torch.no_grad(), intervene(model, capture=cap):
        model(**inputs)
    img = ad.image_mask(inputs["input_ids"])[0]
    k, v = (torch.stack([cap[l][i][0][:, img] for l in range(ad.num_layers)]) for i in (0, 1))
    return TensorBaseline(k, v, "own")


def test_all_heads_ablated_answer_ignores_the_image(built):
    # idefics3 splits the image into tiles with <fake_token_around_image>/<row_i_col_j> between them:
    # those text tokens read the earlier tiles, so ablation acts on every text query after the FIRST
    # image token (group sees_image), or the image would leak through them
    family, spec, model, ad = built
    a, b = (ad.encode([image(s, spec.sizes[0])], [Q_LONG]) for s in (0, 1))
    assert torch.equal(a["input_ids"], b["input_ids"])
    ref = last_logits(model, a)
    assert (ref - last_logits(model, b)).abs().max() > 1e-4  # the image matters
    zero = ZeroBaseline(ad.num_kv_heads, ad.head_dim)
    if ad.hybrid:
        # the recurrent/convolution layers carry the image too, with no heads to ablate (as in
        # tests/test_families.py::test_hybrid_ablation_acts_on_attention_layers_only): every head
        # ablated with the prompt's own image K/V changes nothing, a zero baseline changes the answer
        with intervene(model, ablate="*", baseline=own_image_kv(model, ad, a)):
            torch.testing.assert_close(last_logits(model, a), ref, atol=1e-5, rtol=1e-5)
        with intervene(model, ablate="*", baseline=zero):
            assert (last_logits(model, a) - ref).abs().max() > 1e-4
        return
    with intervene(model, ablate="*", baseline=zero):
        torch.testing.assert_close(last_logits(model, a), last_logits(model, b), atol=1e-5, rtol=0)


def assert_rows_equal_alone(model, ad, batch, images, questions):
    """Under a different random ablation per row, each row of ``batch`` equals its prompt alone."""
    masks = torch.rand(2, ad.num_layers, ad.num_heads, generator=torch.Generator().manual_seed(0)) < 0.5
    base = ZeroBaseline(ad.num_kv_heads, ad.head_dim)
    with intervene(model, ablate=masks, baseline=base):
        batched = last_logits(model, batch)
    for i in range(2):
        with intervene(model, ablate=masks[i : i + 1], baseline=base):
            alone = last_logits(model, ad.encode([images[i]], [questions[i]]))
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-4)


def test_left_padded_batch_equals_each_prompt_alone(built):
    family, spec, model, ad = built
    # images of one size: a baseline replaces image positions by ordinal, so every row needs as many
    images, questions = [image(0, spec.sizes[0]), image(1, spec.sizes[0])], [Q_LONG, Q_SHORT]
    batch = ad.encode(images, questions)
    assert not batch["attention_mask"].all()  # the prompts differ in length: one row is padded
    assert_rows_equal_alone(model, ad, batch, images, questions)


def test_fast_equals_naive_on_the_processor_layout(built):
    family, spec, model, ad = built
    if spec.multi_image:
        inputs = multi_image_inputs(ad, [image(0, spec.sizes[0]), image(1, spec.sizes[1])])
        counts = (spec.feature_counts or feature_counts)(model, inputs)
        assert int(ad.image_mask(inputs["input_ids"]).sum()) == sum(counts)
    else:
        inputs = ad.encode([image(0, spec.sizes[1])], [Q_SHORT])
    if spec.fast_refusal:  # e.g. a prefix-LM: the image attends to the prompt after it, so no cached prefix
        with pytest.raises(HeadsteerError, match=spec.fast_refusal):
            AblationRunner(model, None, ZeroBaseline(ad.num_kv_heads, ad.head_dim), fast=True).prepare(inputs=inputs)
        return
    n = int(ad.image_mask(inputs["input_ids"]).sum())
    masks = torch.rand(4, ad.num_layers, ad.num_heads, generator=torch.Generator().manual_seed(0)) < 0.5
    base = random_baseline(ad, n)
    groups = ad.token_groups(inputs["input_ids"])
    end = int(groups["image"][0].nonzero().max()) + 1
    if bool(groups["sees_image"][0, :end].any()):
        # text between images or tiles is ablated too, so the prefix up to the last image token is
        # not invariant: the fast path refuses that layout and ablated_logits falls back to naive
        with pytest.raises(HeadsteerError, match="between image tokens"):
            AblationRunner(model, None, base, fast=True, chunk=4).prepare(inputs=inputs)
        single = ad.encode([image(0, spec.sizes[1])], [Q_SHORT])
        if fast_path_refusal(ad, single["input_ids"]) is not None:
            return  # image splitting: even one image has text between its tiles
        inputs, n = single, int(ad.image_mask(single["input_ids"]).sum())
        base = random_baseline(ad, n)
    fast = AblationRunner(model, None, base, fast=True, chunk=4).prepare(inputs=inputs)(masks)
    torch.testing.assert_close(fast, naive_logits(model, None, inputs, masks, base), atol=1e-4, rtol=0)


# -- BLIP-2 and InstructBLIP: the processor prepends the image tokens to the tokenized text ----------
BLIP = ["blip-2", "instructblip"]


def blip_processor(family):
    """The real processor; the tokenizer names no image token, so the processor adds ``<image>``
    (pinned to the tiny model's image id) and prepends ``num_query_tokens`` of them to every prompt."""
    ip = BlipImageProcessorPil(size={"height": 32, "width": 32})
    if family == "blip-2":
        return tf.Blip2Processor(ip, make_tokenizer(), num_query_tokens=4)
    return tf.InstructBlipProcessor(ip, make_tokenizer(), make_tokenizer(), num_query_tokens=4)


@pytest.mark.parametrize("family", BLIP)
def test_blip_layout_image_first_then_a_padding_gap(family):
    """The processor left-pads the text and then prepends the image tokens, so a shorter prompt has
    its padding *between* the image and the text. Under ablation the positions still count real
    tokens only, so a padded row equals the prompt alone; the prompt is the question itself."""
    model = tiny(family, batch=1)[0]
    ad = get_adapter(model, blip_processor(family))
    images, questions = [image(0), image(1)], [Q_LONG, Q_SHORT]
    batch = ad.encode(images, questions)
    ids, am, tok = batch["input_ids"], batch["attention_mask"], ad.processor.tokenizer
    assert ad.image_mask(ids)[:, :4].all() and int(ad.image_mask(ids).sum()) == 8
    assert am[1, :4].all() and not am[1].all()  # the gap after the image
    groups = ad.token_groups(ids, am)
    for b, q in enumerate(questions):
        assert tok.convert_ids_to_tokens(ids[b][groups["last"][b]].tolist()) == [q.split()[-1]]
        assert tok.convert_ids_to_tokens(ids[b][groups["question"][b]].tolist()) == q.split()[:-1]
    assert_rows_equal_alone(model, ad, batch, images, questions)


@pytest.mark.parametrize("family", BLIP)
def test_blip_all_heads_ablated_answer_ignores_the_image_on_the_naive_path(family):
    model = tiny(family, batch=1)[0]
    ad = get_adapter(model, blip_processor(family))
    a, b = (ad.encode([image(s)], [Q_LONG]) for s in (0, 1))
    assert (last_logits(model, a) - last_logits(model, b)).abs().max() > 1e-4  # the image matters
    with intervene(model, ablate="*", baseline=ZeroBaseline(ad.num_kv_heads, ad.head_dim)):
        torch.testing.assert_close(last_logits(model, a), last_logits(model, b), atol=1e-5, rtol=0)
    assert fast_path_refusal(ad) is not None  # the forward needs the pixels: ablated_logits runs the naive path
    masks = torch.ones(1, ad.num_layers, ad.num_heads, dtype=torch.bool)
    got = [ablated_logits(model, ad.processor, image(s), Q_LONG, masks, baseline="zero") for s in (0, 1)]
    torch.testing.assert_close(got[0], got[1], atol=1e-5, rtol=0)


def test_shieldgemma2_question_takes_the_policy_place():
    """ShieldGemma2Processor ignores ``text`` (one prompt per image x policy): each encoded row is what
    the processor itself builds for that image with the question as its one custom policy."""
    spec = SPECS["shieldgemma2"]
    model, proc = build("shieldgemma2", spec)
    ad = get_adapter(model, proc)
    images, questions = [image(0), image(1)], [Q_LONG, Q_SHORT]
    batch = ad.encode(images, questions)
    assert len(batch["input_ids"]) == 2
    for b in range(2):
        own = proc(images=[images[b]], custom_policies={"q": questions[b]}, policies=["q"], return_tensors="pt")
        keep = batch["attention_mask"][b].bool()
        for k in ("input_ids", "token_type_ids"):
            assert torch.equal(batch[k][b][keep], own[k][0])
        torch.testing.assert_close(batch["pixel_values"][b], own["pixel_values"][0])
