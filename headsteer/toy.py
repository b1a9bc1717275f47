"""Builders for the embedded default model's architecture: word-level tokenizer, LLaVA processor
for 64x64 images, and a small LLaVA config (CLIP-style vision tower, Llama decoder with GQA).

Used by ``scripts/train_default_model.py`` and by tests that need a small LLaVA with a real
processor.
"""
from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

PROMPT = "USER: <image> {question} ASSISTANT:"
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
ROLE_WORDS = ["user", "assistant", ":"]  # the normalizer lower-cases, so USER/ASSISTANT map here
# Content as parts ({"type": "image"} / {"type": "text"}) or as one string (lmms-eval --force_simple,
# OpenAI-style legacy clients): a string's <image> placeholders go first, as in training, then its text.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% if m['content'] is string %}"
    "{% for _ in range(m['content'].count('<image>')) %}<image> {% endfor %}{{ m['content'].replace('<image>', '') | trim }}"
    "{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    " {% elif m['role'] == 'assistant' %}ASSISTANT: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}"
    " {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer(words):
    vocab = {}
    for w in SPECIAL + ROLE_WORDS + sorted(set(words) - set(SPECIAL) - set(ROLE_WORDS)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Lower-case so that a user's "What colour..." hits the same words as the training data.
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("<image>", behavior="isolated"), pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def build_processor(words, image_size: int = 64, patch_size: int = 8):
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    tok = build_tokenizer(words)
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(vocab_size: int, image_token_id: int, pad_token_id: int, *, text_hidden=128, text_layers=4,
                 heads=8, kv_heads=4, text_mlp=384, vision_hidden=96, vision_layers=2, vision_heads=4,
                 image_size=64, patch_size=8):
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=text_mlp,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=text_hidden // heads,
        max_position_embeddings=256,
        pad_token_id=pad_token_id,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    n_img = (image_size // patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=n_img,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
