"""Shared tooling for tests/test_processors.py: a word-level tokenizer that fits the tiny models'
vocabulary, chat templates cut down to what it knows, random images, and ``ProcessorSpec`` — what a
family's real transformers processor looks like on its tiny model (the ``SPECS`` of the
tests/processors_*.py modules)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable
from unittest import mock

import torch
import transformers as tf
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from headsteer.baseline import TensorBaseline
from tiny_models import IMG, VOCAB, tiny

WORDS = ["USER", "ASSISTANT", "User", "Assistant", "user", "model", "assistant", ":", "what", "colour", "is", "the", "shape",
         "?", "and", "this", "one", "here"]
Q_LONG, Q_SHORT = "what colour is the shape ?", "what shape ?"
SIZES = [(96, 32), (32, 32)]  # a wide image (anyres tiles / splitting) and a square one


@dataclass
class ProcessorSpec:
    """One family's real processor on its tiny model.

    ``role``: (generation-prompt tokens before the last one, the last token); ``around``: tokens the
    processor puts around or between image tokens that are not image features; ``multi_image``: the
    processor takes several images in one prompt; ``tiles``: a wide and a square image get different
    numbers of image tokens; ``fast_refusal``: the fast path refuses even a one-image prompt, with an
    error matching this; ``model``: builds the tiny model (default ``tiny(family, batch=1)[0]``);
    ``sizes``: the (wide, square) image sizes the tests use; ``question_wrap``: the template's words
    before and after the question, between the image and the generation prompt (the ``question`` group
    holds every text token there); ``question_ends_prompt``: the prompt is the question itself (no
    generation prompt), so its last word is the ``last`` token and not in ``question``."""

    processor: Callable[[], object]
    role: tuple[list[str], str]
    around: list[str] = field(default_factory=list)
    multi_image: bool = False
    tiles: bool = False
    fast_refusal: str | None = None
    model: Callable[[], torch.nn.Module] | None = None
    sizes: tuple = tuple(SIZES)
    feature_counts: Callable | None = None  # (model, inputs) -> image tokens per image, where get_image_features differs
    question_wrap: tuple[list[str], list[str]] = ([], [])
    question_ends_prompt: bool = False


def build(family: str, spec: ProcessorSpec):
    """(tiny model of ``family``, its real processor), consistent in vocabulary and special ids."""
    model = spec.model() if spec.model is not None else tiny(family, batch=1)[0]
    return model, spec.processor()


def template(user: str, end: str, gen: str, image: str) -> str:
    """A chat template: user turn ``user`` + contents + ``end``; generation prompt ``gen``; an image content -> ``image``."""
    return ("{% for m in messages %}" + user +
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image +
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}" + end + "{% endfor %}"
            "{% if add_generation_prompt %}" + gen + "{% endif %}")



def make_tokenizer(named: dict[str, str] | None = None, specials: tuple[str, ...] = (), ids: dict[str, int] | None = None,
                   cls=tf.PreTrainedTokenizerFast):
    """Word-level fast tokenizer over ``WORDS`` whose vocabulary fits the tiny models' (``VOCAB``).

    ``named``: attribute -> token (``image_token`` ...); ``specials``: further special tokens;
    ``ids``: tokens pinned to the ids the tiny model's config names (the image token at ``IMG``);
    ``cls``: the tokenizer class (a subclass of PreTrainedTokenizerFast)."""
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
    fast = cls(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
               eos_token="</s>", extra_special_tokens=named)
    extra = [t for t in specials if t not in named.values()]
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    return fast


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
    return dict(ad.processor(images=[images], text=[text], return_tensors="pt", **ad.processor_kwargs()))


def last_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def random_baseline(ad, n, seed=3):
    """Another image's K/V at the ``n`` image positions (exercises the replacement path)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(ad.num_layers, ad.num_kv_heads, n, ad.head_dim, generator=g)
    return TensorBaseline(k, torch.randn(k.shape, generator=g), "test")


def unchecked_video(cls, *args, **kwargs):
    """``cls(*args, **kwargs)``: the family's real processor class, built without ProcessorMixin's class
    check of its video processor. That check looks the base class ``VideoProcessorMixin`` up among
    transformers' exports, which hold it only where torchvision works (not here), so it fails for any
    video processor, None included. The video processor (None, or a real one that is never called)
    serves only the video path, which these tests do not take."""
    check = cls.check_argument_for_proper_class

    def lenient(self, name, arg):
        return None if name == "video_processor" else check(self, name, arg)

    with mock.patch.object(cls, "check_argument_for_proper_class", lenient):
        return cls(*args, **kwargs)
