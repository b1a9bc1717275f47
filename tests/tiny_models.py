"""Tiny randomly initialised VLMs of each supported family, built from their transformers
configs, with a ready batch (input_ids with image tokens, pixel inputs) — no hub access needed."""
from __future__ import annotations

import torch

VOCAB = 96
IMG = 90  # image token id in every tiny model
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8, projection_dim=32)
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              image_size=32, patch_size=8)


def _ids(n_img, batch, prompt_len=5, tail_len=6, seed=0, pad=0, pre=None):
    """[text][image x n_img][question...][role][last]; row b gets b left-pad tokens."""
    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    T = prompt_len + n_img + tail_len + (batch - 1)
    for b in range(batch):
        head = torch.randint(3, 80, (prompt_len,), generator=g)
        tail = torch.randint(3, 80, (tail_len + batch - 1 - b,), generator=g)
        mid = torch.full((n_img,), IMG) if pre is None else pre
        seq = torch.cat([head, mid, tail])
        p = T - len(seq)
        rows.append(torch.cat([torch.full((p,), pad), seq]))
        masks.append(torch.cat([torch.zeros(p, dtype=torch.long), torch.ones(len(seq), dtype=torch.long)]))
    return torch.stack(rows), torch.stack(masks)


def _llava(batch):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP), text_config=LlamaConfig(**TEXT),
                      image_token_index=IMG, image_seq_length=16, vision_feature_layer=-1)
    ids, am = _ids(16, batch)
    return LlavaForConditionalGeneration(cfg), dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(batch, 3, 32, 32))


def _vipllava(batch):
    from transformers import CLIPVisionConfig, LlamaConfig, VipLlavaConfig, VipLlavaForConditionalGeneration

    cfg = VipLlavaConfig(vision_config=CLIPVisionConfig(**{**CLIP, "num_hidden_layers": 2}), text_config=LlamaConfig(**TEXT),
                         image_token_index=IMG, image_seq_length=16, vision_feature_layers=[-2, -1])
    ids, am = _ids(16, batch)
    return VipLlavaForConditionalGeneration(cfg), dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(batch, 3, 32, 32))


def _aya(batch):
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, SiglipVisionConfig
    from transformers import CohereConfig

    cfg = AyaVisionConfig(vision_config=SiglipVisionConfig(**SIGLIP), text_config=CohereConfig(**{**TEXT, "logit_scale": 1.0}),
                          image_token_index=IMG, downsample_factor=2, vision_feature_layer=-1)
    ids, am = _ids(4, batch)
    return AyaVisionForConditionalGeneration(cfg), dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(batch, 3, 32, 32))


def _llava_next(batch):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**CLIP), text_config=LlamaConfig(**TEXT), image_token_index=IMG,
                          image_grid_pinpoints=[[32, 32]], vision_feature_layer=-1, image_seq_length=16)
    n = 16 + 4 * 5  # base 4x4 + unpadded 4x4 grid with a newline token per row
    ids, am = _ids(n, batch)
    return LlavaNextForConditionalGeneration(cfg), dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(batch, 2, 3, 32, 32),
                                                         image_sizes=torch.tensor([[32, 32]] * batch))


def _llava_onevision(batch):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**SIGLIP), text_config=Qwen2Config(**TEXT), image_token_index=IMG,
                               image_grid_pinpoints=[[32, 32]], vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    n = 16 + 4 * 5
    ids, am = _ids(n, batch)
    return LlavaOnevisionForConditionalGeneration(cfg), dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(batch, 2, 3, 32, 32),
                                                              image_sizes=torch.tensor([[32, 32]] * batch))


def _qwen_vl(batch, version):
    import transformers as tf

    Cfg, Model = {
        "qwen2_vl": (tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration),
        "qwen3_vl": (tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration),
    }[version]
    text = {**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}}
    if version == "qwen3_vl":
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, temporal_patch_size=2,
                      spatial_merge_size=2, out_hidden_size=32, num_position_embeddings=16, deepstack_visual_indexes=[0])
    elif version == "qwen2_5_vl":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, temporal_patch_size=2,
                      spatial_merge_size=2, out_hidden_size=32, window_size=16, fullatt_block_indexes=[0])
    else:
        vision = dict(depth=1, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=2, patch_size=4, temporal_patch_size=2,
                      spatial_merge_size=2)
    cfg = Cfg(text_config=text, vision_config=vision, image_token_id=IMG, vision_start_token_id=88, vision_end_token_id=89,
              video_token_id=87)
    grid = torch.tensor([[1, 4, 4]] * batch)  # 16 patches -> 4 tokens after 2x2 merge
    n = 4
    pre = torch.cat([torch.tensor([88]), torch.full((n,), IMG), torch.tensor([89])])
    ids, am = _ids(n + 2, batch, pre=pre)
    pix = torch.randn(batch * 16, 3 * 2 * 4 * 4)
    return Model(cfg), dict(input_ids=ids, attention_mask=am, pixel_values=pix, image_grid_thw=grid,
                            mm_token_type_ids=(ids == IMG).long())


def _idefics3(batch, smol=False):
    import transformers as tf

    Cfg, Model, VCfg = ((tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration, tf.SmolVLMVisionConfig) if smol else
                        (tf.Idefics3Config, tf.Idefics3ForConditionalGeneration, tf.Idefics3VisionConfig))
    cfg = Cfg(vision_config=VCfg(**SIGLIP), text_config=tf.LlamaConfig(**TEXT), image_token_id=IMG, scale_factor=2)
    n = 16 // 4
    ids, am = _ids(n, batch)
    return Model(cfg), dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(batch, 1, 3, 32, 32),
                            pixel_attention_mask=torch.ones(batch, 1, 32, 32, dtype=torch.bool))


def _gemma3(batch):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = {**TEXT, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"], "query_pre_attn_scalar": 8}
    cfg = Gemma3Config(vision_config=SiglipVisionConfig(**SIGLIP), text_config=Gemma3TextConfig(**text), image_token_index=IMG,
                       mm_tokens_per_image=4, boi_token_index=85, eoi_token_index=86)
    ids, am = _ids(4, batch)
    model = Gemma3ForConditionalGeneration(cfg)
    for p in model.model.multi_modal_projector.parameters():  # initialised to zeros: the image would not matter
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.5)
    return model, dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(batch, 3, 32, 32))


def _paligemma(batch):
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    cfg = PaliGemmaConfig(vision_config=SiglipVisionConfig(**SIGLIP), text_config=GemmaConfig(**TEXT), image_token_index=IMG,
                          projection_dim=32)
    ids, am = _ids(16, batch, prompt_len=0)
    # as its processor makes them: 0 for the prefix (image + prompt), 1 would mark a suffix
    return PaliGemmaForConditionalGeneration(cfg), dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(batch, 3, 32, 32),
                                                         token_type_ids=torch.zeros_like(ids))


def _mistral3(batch):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=8, head_dim=16)
    cfg = Mistral3Config(vision_config=vision, text_config=MistralConfig(**TEXT), image_token_index=IMG,
                         spatial_merge_size=2, vision_feature_layer=-1)
    ids, am = _ids(4, batch)
    return Mistral3ForConditionalGeneration(cfg), dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(batch, 3, 32, 32),
                                                        image_sizes=torch.tensor([[32, 32]] * batch))


def _internvl(batch):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=[32, 32], patch_size=[8, 8])
    cfg = InternVLConfig(vision_config=vision, text_config=Qwen2Config(**TEXT), image_token_id=IMG, downsample_ratio=0.5,
                         vision_feature_layer=-1)
    ids, am = _ids(4, batch)
    return InternVLForConditionalGeneration(cfg), dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(batch, 3, 32, 32))


BUILDERS = {
    "llava": _llava,
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": lambda b: _qwen_vl(b, "qwen2_vl"),
    "qwen2_5_vl": lambda b: _qwen_vl(b, "qwen2_5_vl"),
    "qwen3_vl": lambda b: _qwen_vl(b, "qwen3_vl"),
    "idefics3": _idefics3,
    "smolvlm": lambda b: _idefics3(b, smol=True),
    "gemma3": _gemma3,
    "paligemma": _paligemma,
    "mistral3": _mistral3,
    "internvl": _internvl,
    "aya_vision": _aya,
    "vipllava": _vipllava,
}


def tiny(family: str, batch: int = 2, seed: int = 0):
    """(model in eval mode, batch dict) for a family."""
    torch.manual_seed(seed)
    model, inputs = BUILDERS[family](batch)
    return model.eval(), inputs


def other_pixels(inputs, seed=1):
    """The same batch with different random pixels."""
    g = torch.Generator().manual_seed(seed)
    out = dict(inputs)
    out["pixel_values"] = torch.randn(inputs["pixel_values"].shape, generator=g)
    return out
