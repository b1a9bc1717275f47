"""Write a randomly initialised checkpoint with the shape of a real VLM, with a working processor,
that ``headsteer.load`` opens — for timing and memory checks at paper scale without a download.

    python scripts/make_shaped_checkpoint.py --shape llava-1.5-7b --out /tmp/llava7b --device cuda --dtype bf16
    python scripts/make_shaped_checkpoint.py --shape qwen2.5-vl-7b --out /tmp/qwen7b --device cuda --dtype bf16
    python scripts/make_shaped_checkpoint.py --shape llava-1.5-7b --small --out /tmp/llava-small   # same structure, tiny

Shapes (from the published configs): LLaVA-1.5-7B = CLIP ViT-L/14 at 336 px (576 image tokens) +
Llama-2-7B (32 layers x 32 heads, head_dim 128, vocab 32064); Qwen2.5-VL-7B = its 32-block ViT +
Qwen2 decoder (28 layers x 28 query / 4 KV heads, vocab 152064), 336 px images (144 image tokens).
The tokenizer is word-level (easy-VQA words plus role words): prompts tokenize as a real chat
template would lay them out, not with the real vocabulary.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import _checkout  # noqa: F401  (refuses to run against another tree's headsteer)
import torch

from headsteer import toy

WORDS = ("what is the shape color colour in image does this contain a an circle rectangle triangle red green blue "
         "yellow teal brown gray black white yes no not of there").split()

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def llava(small: bool):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    processor = toy.build_processor(WORDS, image_size=336 if not small else 56, patch_size=14)
    tok = processor.tokenizer
    if small:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=56, patch_size=14, projection_dim=64)
        text = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    text.pad_token_id, text.bos_token_id, text.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    n_img = (vision.image_size // vision.patch_size) ** 2
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      image_seq_length=n_img, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return cfg, processor, "LlavaForConditionalGeneration"


def _qwen_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    for w in QWEN_SPECIAL + ["<unk>", "user", "assistant", "system", ":"] + sorted(set(WORDS)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    specials = "|".join(s.replace("|", r"\|") for s in QWEN_SPECIAL)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(__import__("tokenizers").Regex(specials), behavior="isolated"),
                                                 pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   padding_side="left", extra_special_tokens={"image_token": "<|image_pad|>",
                                                                              "video_token": "<|video_pad|>"})
    fast.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    return fast


def qwen25(small: bool):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _qwen_tokenizer()
    px = 336 if not small else 56
    ip = Qwen2VLImageProcessorPil(min_pixels=px * px, max_pixels=px * px)
    try:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        processor = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                        chat_template=QWEN_TEMPLATE)
    except (AttributeError, ImportError, TypeError) as e:  # the video processor needs torchvision
        raise SystemExit(f"Qwen2.5-VL's processor needs torchvision (install the build matching your torch): {e}")
    if small:
        text = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    else:
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, max_position_embeddings=32768,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
    text.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    ids = {n: tok.convert_tokens_to_ids(t) for n, t in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                                                        ("vision_start_token_id", "<|vision_start|>"),
                                                        ("vision_end_token_id", "<|vision_end|>"))}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    return cfg, processor, "Qwen2_5_VLForConditionalGeneration"


SHAPES = {"llava-1.5-7b": llava, "qwen2.5-vl-7b": qwen25}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llava-1.5-7b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to initialise the weights")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--small", action="store_true", help="same structure and processor, tiny widths (for CPU smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import transformers

    t0 = time.time()
    cfg, processor, cls_name = SHAPES[args.shape](args.small)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = getattr(transformers, cls_name)(cfg).to(DTYPES[args.dtype]).eval()
    out = Path(args.out)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {args.shape}{' (small)' if args.small else ''}, {n / 1e9:.2f}B parameters, {args.dtype}, "
          f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
