"""Tiny models of several families with their real transformers processor classes (a word-level
tokenizer holding the family's special tokens, a Pil image processor sized for the tiny vision tower,
a small chat template), so the token layouts, chat templates and role-token detection that real
checkpoints produce go through ``Adapter.encode`` — tests/tiny_models.py feeds hand-made input_ids."""
from __future__ import annotations

import inspect

import pytest
import torch
import transformers as tf
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from headsteer import HeadsteerError, get_adapter, intervene
from headsteer.attribution.engine import SuffixRunner, ablated_logits, fast_path_refusal, naive_logits
from headsteer.baseline import TensorBaseline, ZeroBaseline
from tiny_models import CLIP, IMG, TEXT, VOCAB, tiny

WORDS = ["USER", "ASSISTANT", "User", "Assistant", "user", "model", "assistant", ":", "what", "colour", "is", "the", "shape",
         "?", "and", "this", "one", "here"]
Q_LONG, Q_SHORT = "what colour is the shape ?", "what shape ?"

# -- chat templates: the families' turn markup, cut down to what the tokenizer knows ---------------


def _template(user: str, end: str, gen: str, image: str) -> str:
    """user turn ``user`` + contents + ``end``; generation prompt ``gen``; an image content -> ``image``."""
    return ("{% for m in messages %}" + user +
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image +
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}" + end + "{% endfor %}"
            "{% if add_generation_prompt %}" + gen + "{% endif %}")


TEMPLATES = {
    "llava": _template("USER: ", " ", "ASSISTANT:", "<image>\n"),
    "idefics3": _template("<|im_start|>User:", "<end_of_utterance>\n", "Assistant:", "<image>"),
    "gemma3": _template("<start_of_turn>user\n", "<end_of_turn>\n", "<start_of_turn>model\n", "<start_of_image>"),
    "llama4": _template("<|header_start|>user<|header_end|>\n\n", "<|eot|>", "<|header_start|>assistant<|header_end|>\n\n",
                        "<|image|>"),
}
TEMPLATES["llava_next"] = TEMPLATES["llava"]


def make_tokenizer(named: dict[str, str] | None = None, specials: tuple[str, ...] = (), ids: dict[str, int] | None = None):
    """Word-level fast tokenizer over ``WORDS`` whose vocabulary fits the tiny models' (``VOCAB``).

    ``named``: attribute -> token (``image_token`` ...); ``specials``: further special tokens;
    ``ids``: tokens pinned to the ids the tiny model's config names (the image token at ``IMG``)."""
    named, ids = named or {}, ids or {"<image>": IMG}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    free = iter(i for i in range(VOCAB) if i not in ids.values() and i >= len(vocab))
    for t in [*WORDS, *named.values(), *specials]:
        if t not in vocab and t not in ids:
            vocab[t] = next(free)
    vocab.update(ids)
    for i in set(range(VOCAB)) - set(vocab.values()):  # contiguous ids, as the embedding expects
        vocab[f"<unused{i}>"] = i
    assert len(vocab) == VOCAB, "tokens do not fit the tiny vocabulary"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                      eos_token="</s>", extra_special_tokens=named)
    extra = [t for t in specials if t not in named.values()]
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    return fast


# -- models and processors ---------------------------------------------------------------------------
PINPOINTS = [[32, 32], [32, 64], [64, 32]]  # anyres: a wide image gets two 32x32 tiles besides the base view


def _llava_next_model():
    cfg = tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**CLIP), text_config=tf.LlamaConfig(**TEXT), image_token_index=IMG,
                             image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1, image_seq_length=16)
    torch.manual_seed(0)
    return tf.LlavaNextForConditionalGeneration(cfg).eval()


def _llava_kw(family):
    return dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=TEMPLATES[family])


def _processor(family):
    if family == "llava":
        ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        return tf.LlavaProcessor(ip, make_tokenizer({"image_token": "<image>"}), **_llava_kw(family))
    if family == "llava_next":
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=PINPOINTS)
        return tf.LlavaNextProcessor(ip, make_tokenizer({"image_token": "<image>"}), **_llava_kw(family))
    if family == "idefics3":
        rows = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
        tok = make_tokenizer(specials=("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>", *rows))
        # images are resized to a multiple of 32 (longest edge 64) and split into 32x32 tiles plus a global view
        ip = Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
        return tf.Idefics3Processor(ip, tok, image_seq_len=4, chat_template=TEMPLATES[family])
    if family == "paligemma":
        ip = SiglipImageProcessorPil(size={"height": 32, "width": 32})
        ip.image_seq_length = 16
        return tf.PaliGemmaProcessor(ip, make_tokenizer({"image_token": "<image>"}, specials=("\n",)))
    if family == "gemma3":
        named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        tok = make_tokenizer(named, ("<start_of_turn>", "<end_of_turn>"),
                             ids={"<image_soft_token>": IMG, "<start_of_image>": 85, "<end_of_image>": 86})
        return tf.Gemma3Processor(Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tok, image_seq_length=4,
                                  chat_template=TEMPLATES[family])
    if family == "llama4":
        # the processor expands <|image|> into <|image_start|><|image|><|patch|> x 4<|image_end|>; the
        # model's image token (config image_token_index) is <|patch|>, not the processor's <|image|>
        tok = make_tokenizer(specials=("<|patch|>", "<|image|>", "<|image_start|>", "<|image_end|>", "<|tile_x_separator|>",
                                       "<|tile_y_separator|>", "<|header_start|>", "<|header_end|>", "<|eot|>"),
                             ids={"<|patch|>": IMG})
        return tf.Llama4Processor(OneTileLlama4ImageProcessor(size={"height": 32, "width": 32}), tok, patch_size=8,
                                  chat_template=TEMPLATES[family])
    raise KeyError(family)


class OneTileLlama4ImageProcessor(SiglipImageProcessorPil):
    """Llama4ImageProcessor needs torchvision, which headsteer does not depend on. This stand-in gives
    its output for images that fit one tile (no tiling, no global view): pixel_values [1, 3, 32, 32]
    and aspect ratio (1, 1) per image — what the real Llama4Processor lays the prompt out from."""

    def __call__(self, images, **kwargs):
        out = super().__call__(images, **kwargs)
        out["aspect_ratios"] = torch.ones(len(out["pixel_values"]), 2, dtype=torch.long)
        return out


FAMILIES = ["llava", "llava_next", "idefics3", "paligemma", "gemma3", "llama4"]


def build(family):
    """(tiny model of ``family``, its real processor), consistent in vocabulary and special ids."""
    model = _llava_next_model() if family == "llava_next" else tiny(family, batch=1)[0]
    return model, _processor(family)


def image(seed=0, size=(32, 32)):
    """A random RGB PIL image (width, height)."""
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


def feature_counts(model, inputs) -> list[int]:
    """Image features per image, as the model's own ``get_image_features`` makes them."""
    f = getattr(model, "model", model).get_image_features  # Llama 4 keeps it on the outer model
    kw = {k: v for k, v in inputs.items() if k in inspect.signature(f).parameters}
    with torch.no_grad():
        out = f(**kw)
    pooled = getattr(out, "pooler_output", None)
    out = pooled if pooled is not None else getattr(out, "last_hidden_state", out)  # Llama 4 has no pooled output
    return [len(x) for x in out] if isinstance(out, (list, tuple)) else [out.shape[1]] * out.shape[0]


def multi_image_inputs(ad, images, question=Q_SHORT):
    """One prompt holding several images, through the chat template and processor."""
    msgs = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": question}]}]
    text = ad.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return dict(ad.processor(images=[images], text=[text], return_tensors="pt"))


def last_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def random_baseline(ad, n, seed=3):
    """Another image's K/V at the ``n`` image positions (exercises the replacement path)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(ad.num_layers, ad.num_kv_heads, n, ad.head_dim, generator=g)
    return TensorBaseline(k, torch.randn(k.shape, generator=g), "test")


@pytest.fixture(scope="module", params=FAMILIES)
def built(request):
    model, proc = build(request.param)
    return request.param, model, get_adapter(model, proc)


# role tokens before the last one, and the last token, of each family's generation prompt
ROLE = {"llava": (["ASSISTANT"], ":"), "llava_next": (["ASSISTANT"], ":"), "idefics3": (["Assistant"], ":"),
        "gemma3": (["<start_of_turn>"], "model"), "llama4": (["<|header_start|>", "assistant"], "<|header_end|>"),
        "paligemma": ([], "\n")}  # no chat template: the processor ends the prompt with "\n"
# tokens a processor puts around or between image tokens that are not image features
AROUND = {"idefics3": ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_1_col_2>"],
          "gemma3": ["<start_of_image>", "<end_of_image>"], "paligemma": ["<s>"],
          "llama4": ["<|image_start|>", "<|image|>", "<|image_end|>"]}
SIZES = [(96, 32), (32, 32)]  # a wide image (anyres tiles / splitting) and a square one


def test_image_mask_is_exactly_the_processor_image_tokens(built):
    family, model, ad = built
    inputs = ad.encode([image(0, SIZES[0]), image(1, SIZES[1])], [Q_LONG, Q_SHORT])
    ids, tok = inputs["input_ids"], ad.processor.tokenizer
    mask = ad.image_mask(ids)
    assert torch.equal(mask, ids == IMG)  # the config's image token, which the processor expanded
    assert mask.sum(1).tolist() == feature_counts(model, inputs)  # one image per prompt here
    present = set(tok.convert_ids_to_tokens(ids[~mask].tolist()))
    assert set(AROUND.get(family, [])) <= present  # the layout has them, and they are not image tokens
    if family in ("llava_next", "idefics3"):  # the wide and the square image get different tiles
        assert mask[0].sum() != mask[1].sum()


def test_token_groups_follow_the_chat_template(built):
    family, model, ad = built
    inputs = ad.encode([image(0), image(1)], [Q_LONG, Q_SHORT])
    ids, tok = inputs["input_ids"], ad.processor.tokenizer
    groups = ad.token_groups(ids, inputs["attention_mask"])
    role, last = ROLE[family]
    assert ad.num_role_tokens() == len(role) + 1
    for b, q in enumerate([Q_LONG, Q_SHORT]):
        names = lambda g: tok.convert_ids_to_tokens(ids[b][groups[g][b]].tolist())  # noqa: E731
        assert names("role") == role
        assert names("last") == [last] and groups["last"][b, -1]
        assert names("question") == q.split()
        assert not (groups["question"] & groups["image"]).any()


def test_all_heads_ablated_answer_ignores_the_image(built, request):
    # idefics3 splits the image into tiles with <fake_token_around_image>/<row_i_col_j> between them:
    # those text tokens read the earlier tiles, so ablation acts on every text query after the FIRST
    # image token (group sees_image), or the image would leak through them
    family, model, ad = built
    a, b = (ad.encode([image(s, SIZES[0])], [Q_LONG]) for s in (0, 1))
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert (last_logits(model, a) - last_logits(model, b)).abs().max() > 1e-4  # the image matters
    with intervene(model, ablate="*", baseline=ZeroBaseline(ad.num_kv_heads, ad.head_dim)):
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
    family, model, ad = built
    # images of one size: a baseline replaces image positions by ordinal, so every row needs as many
    images, questions = [image(0, SIZES[0]), image(1, SIZES[0])], [Q_LONG, Q_SHORT]
    batch = ad.encode(images, questions)
    assert not batch["attention_mask"].all()  # the prompts differ in length: one row is padded
    assert_rows_equal_alone(model, ad, batch, images, questions)


MULTI_IMAGE = {"llava", "llava_next", "idefics3", "gemma3", "llama4"}  # processors that take several images in one prompt


def test_fast_equals_naive_on_the_processor_layout(built):
    family, model, ad = built
    if family in MULTI_IMAGE:
        inputs = multi_image_inputs(ad, [image(0, SIZES[0]), image(1, SIZES[1])])
        counts = feature_counts(model, inputs)
        assert int(ad.image_mask(inputs["input_ids"]).sum()) == sum(counts)
    else:
        inputs = ad.encode([image(0)], [Q_SHORT])
    if family == "paligemma":  # prefix-LM: the image attends to the prompt after it, so no cached prefix
        with pytest.raises(HeadsteerError, match="bidirectionally"):
            SuffixRunner(model, None, None, None, ZeroBaseline(ad.num_kv_heads, ad.head_dim), inputs=inputs)
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
            SuffixRunner(model, None, None, None, base, inputs=inputs, chunk=4)
        single = ad.encode([image(0)], [Q_SHORT])
        if fast_path_refusal(ad, single["input_ids"]) is not None:
            return  # image splitting: even one image has text between its tiles
        inputs, n = single, int(ad.image_mask(single["input_ids"]).sum())
        base = random_baseline(ad, n)
    fast = SuffixRunner(model, None, None, None, base, inputs=inputs, chunk=4)(masks)
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
