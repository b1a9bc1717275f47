"""Tiny randomly initialised VLMs of each supported family, built from their transformers
configs, with a ready batch (input_ids with image tokens, pixel inputs) — no hub access needed."""
from __future__ import annotations

import inspect

import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as MAPPING

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


def _granite4_vision(batch):
    """Granite 4 Vision: LLaVA-NeXT anyres (one 32x32 tile + base image) through a window Q-Former
    (rate 1/2) into 10 image tokens; DeepStack and spatial features added at image positions of text
    layers 0 and 1. Vision width 64: the Q-Former takes one head per 64 channels."""
    import transformers as tf

    text = dict(TEXT, embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0, attention_multiplier=0.125)
    qformer = dict(num_hidden_layers=1, intermediate_size=64, cross_attention_frequency=1, max_position_embeddings=64,
                   use_qformer_text_input=False)
    return _plain(tf.Granite4VisionForConditionalGeneration, tf.Granite4VisionConfig, 10, batch,
                  _pix(2, 3, 32, 32, image_sizes=lambda b: torch.tensor([[32, 32]] * b)),
                  text_config=text, vision_config=dict(CLIP, hidden_size=64, num_hidden_layers=2), qformer_config=qformer,
                  image_token_index=IMG, image_grid_pinpoints=[[32, 32]], downsample_rate="1/2", deepstack_layer_map=[[0, 0], [1, 1]],
                  spatial_target_layers=[0, 1, 0, 1], vision_feature_layer=-1, projector_dropout=0.0)


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
        "cosmos3_omni": (tf.Cosmos3OmniConfig, tf.Cosmos3OmniForConditionalGeneration),  # Qwen3-VL's architecture
    }[version]
    text = {**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}}
    if version in ("qwen3_vl", "cosmos3_omni"):
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


def _llava_onevision1_5(batch):
    """LLaVA-OneVision-1.5: a RICE ViT (2D RoPE, a class token per image) over flattened 4x4 patches, merged
    2x2 into 4 image tokens between <|vision_start|> and <|vision_end|>; Qwen3 text with 1D positions."""
    import transformers as tf

    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  out_hidden_size=32)
    cfg = tf.LlavaOnevision15Config(text_config=tf.Qwen3Config(**TEXT), vision_config=vision, image_token_id=IMG,
                                    video_token_id=87, vision_start_token_id=88, vision_end_token_id=89)
    pre = torch.cat([torch.tensor([88]), torch.full((4,), IMG), torch.tensor([89])])
    ids, am = _ids(6, batch, pre=pre)
    return tf.LlavaOnevision15ForConditionalGeneration(cfg), dict(input_ids=ids, attention_mask=am,
                                                                  pixel_values=torch.randn(batch * 16, 3 * 4 * 4),
                                                                  image_grid_thw=torch.tensor([[1, 4, 4]] * batch))


def _idefics3(batch, smol=False):
    import transformers as tf

    Cfg, Model, VCfg = ((tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration, tf.SmolVLMVisionConfig) if smol else
                        (tf.Idefics3Config, tf.Idefics3ForConditionalGeneration, tf.Idefics3VisionConfig))
    cfg = Cfg(vision_config=VCfg(**SIGLIP), text_config=tf.LlamaConfig(**TEXT), image_token_id=IMG, scale_factor=2)
    n = 16 // 4
    ids, am = _ids(n, batch)
    return Model(cfg), dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(batch, 1, 3, 32, 32),
                            pixel_attention_mask=torch.ones(batch, 1, 32, 32, dtype=torch.bool))


def _granite_docling(batch):
    """Granite-Docling: one 32x32 tile -> 4 image tokens (pixel shuffle 2); vision layer 0's DeepStack
    features are added at the image positions after text layer 0; Granite's multipliers kept neutral."""
    import transformers as tf

    vision = dict(SIGLIP, num_hidden_layers=2, out_hidden_size=32, scale_factor=2, deepstack_visual_indexes=[0], use_fine_route=False)
    text = dict(TEXT, embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0, attention_multiplier=0.125)
    return _plain(tf.GraniteDoclingForConditionalGeneration, tf.GraniteDoclingConfig, 4, batch,
                  _pix(1, 3, 32, 32, pixel_attention_mask=lambda b: torch.ones(b, 1, dtype=torch.bool)),
                  text_config=text, vision_config=vision, image_token_id=IMG)


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


def _qianfan_ocr(batch):
    import transformers as tf

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=[32, 32],
                  patch_size=[8, 8])
    return _plain(tf.QianfanOCRForConditionalGeneration, tf.QianfanOCRConfig, 4, batch, _pix(3, 32, 32), vision_config=vision,
                  text_config=tf.Qwen3Config(**TEXT), image_token_id=IMG, downsample_ratio=0.5, vision_feature_layer=-1)


def _plain(Model, Cfg, n_img, batch, pixels, **cfg):
    """A family whose image tokens are one contiguous run of ``n_img`` tokens: model, batch."""
    ids, am = _ids(n_img, batch)
    return Model(Cfg(**cfg)), dict(input_ids=ids, attention_mask=am, **pixels(batch))


def _pix(*shape, **extra):
    """pixels(batch) -> {"pixel_values": randn(batch, *shape), **extra(batch)}"""
    def make(batch):
        out = {"pixel_values": torch.randn(batch, *shape)}
        out.update({k: f(batch) for k, f in extra.items()})
        return out
    return make


SAM = dict(hidden_size=32, output_channels=16, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16,
           mlp_dim=64, global_attn_indexes=[0], window_size=2, initializer_range=0.2)
WINDOWED = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])


def _llava_next_video(batch):
    import transformers as tf

    return _plain(tf.LlavaNextVideoForConditionalGeneration, tf.LlavaNextVideoConfig, 16 + 4 * 5, batch,
                  _pix(2, 3, 32, 32, image_sizes=lambda b: torch.tensor([[32, 32]] * b)),
                  vision_config=tf.CLIPVisionConfig(**CLIP), text_config=tf.LlamaConfig(**TEXT), image_token_index=IMG,
                  video_token_index=89, image_grid_pinpoints=[[32, 32]], vision_feature_layer=-1, image_seq_length=16)


def _video_llava(batch):
    import transformers as tf

    def pixels(b):
        return {"pixel_values_images": torch.randn(b, 3, 32, 32)}
    return _plain(tf.VideoLlavaForConditionalGeneration, tf.VideoLlavaConfig, 16, batch, pixels,
                  vision_config=tf.CLIPVisionConfig(**CLIP), text_config=tf.LlamaConfig(**TEXT), image_token_index=IMG,
                  video_token_index=89, vision_feature_layer=-1, image_seq_length=16)


def _video_llama_3(batch):
    """VideoLLaMA3: flattened 4x4 patches (Qwen2-VL style, 16 per image) merged 2x2 into 4 image tokens;
    plain 1D positions."""
    import transformers as tf

    def pixels(b):
        return dict(pixel_values=torch.randn(b * 16, 3 * 4 * 4), image_grid_thw=torch.tensor([[1, 4, 4]] * b),
                    image_merge_sizes=torch.tensor([2] * b))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=4)
    return _plain(tf.VideoLlama3ForConditionalGeneration, tf.VideoLlama3Config, 4, batch, pixels,
                  text_config=tf.Qwen2Config(**TEXT), vision_config=vision, image_token_id=IMG, video_token_id=87)


def _muse_glimmer(batch, spark=False):
    """Muse Glimmer: 16 flattened 4x4 patches (2 frames) pixel-shuffled 2x2 into 4 image tokens; text with
    per-head sigmoid output gates, layer 0 sliding-window, neutral scale factors. Muse Spark: the same
    with a per-head output norm, a MoE layer 1 and a (tiny, unused) audio tower."""
    import transformers as tf

    text = dict(TEXT, **WINDOWED, final_logit_softcapping=30.0, qk_scale_factor=1.0, output_multiplier=1.0)
    extra = {}
    if spark:
        text.update(moe_intermediate_size=16, num_local_experts=2, num_experts_per_tok=1, moe_hidden_size=16,
                    mlp_layer_types=["dense", "sparse"])
        extra = dict(audio_config=dict(patch_sizes=[2, 2], hidden_sizes=[8, 16], depths=[1, 1], num_hidden_layers=2, out_hidden_size=32),
                     audio_token_id=86)
    vision = dict(patch_size=4, pos_emb_height=4, pos_emb_width=4, pos_emb_time=1, num_attention_heads=2, num_hidden_layers=1,
                  hidden_size=32, intermediate_size=64, max_position_embeddings=16)

    def pixels(b):
        return dict(pixel_values=torch.randn(b * 16, 2 * 3 * 4 * 4), image_grid_thw=torch.tensor([[1, 4, 4]] * b))
    Model, Cfg = ((tf.MuseSparkForConditionalGeneration, tf.MuseSparkConfig) if spark else
                  (tf.MuseGlimmerForConditionalGeneration, tf.MuseGlimmerConfig))
    return _plain(Model, Cfg, 4, batch, pixels, text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=87,
                  out_hidden_size=128, projector_hidden_size=32, **extra)


def molmo2_pooling_per_image() -> bool:
    """Whether Molmo2's image_token_pooling counts patches per image (transformers >= 5.25: the model adds
    each image's offset, from image_num_crops) or over the whole batch (5.24: the processor added them)."""
    import transformers as tf

    return "image_num_crops" in inspect.signature(tf.Molmo2Model.get_image_features).parameters


def _molmo2(batch):
    """Molmo2: one 16x16 crop per image (16 patches of 4x4), pooled 2x2 into 4 image tokens; the pooling
    indices count patches per image or over the whole batch, as the installed transformers expects
    (``molmo2_pooling_per_image``). Image tokens attend to each other bidirectionally.
    Vision and adapter initialised wider (0.3): at 0.02 the tiny image features are ~1e-9."""
    import transformers as tf

    text = dict({k: v for k, v in TEXT.items() if k != "max_position_embeddings"}, additional_vocab_size=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                  image_size=[16, 16], patch_size=4, num_position_embeddings=16, initializer_range=0.3)
    adapter = dict(vision_feature_layer=[-1], hidden_size=32, num_attention_heads=2, num_key_value_heads=2, head_dim=16, intermediate_size=64,
                   text_hidden_size=32, initializer_range=0.3)
    cfg = tf.Molmo2Config(text_config=text, vision_config=vision, adapter_config=adapter, image_patch_id=IMG, image_start_token_id=88,
                          image_end_token_id=89, low_res_image_start_token_id=87, frame_start_token_id=86, frame_end_token_id=85)
    local = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])  # 2x2 windows of the 4x4 patch grid
    ids, am = _ids(4, batch)
    per_image = molmo2_pooling_per_image()
    return tf.Molmo2ForConditionalGeneration(cfg), dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(batch, 1, 16, 48),
                                                       image_token_pooling=torch.cat([local + (0 if per_image else 16 * b) for b in range(batch)]),
                                                       image_grids=torch.tensor([[2, 2, 0, 0]] * batch),
                                                       image_num_crops=torch.tensor([1] * batch), mm_token_type_ids=(ids == IMG).long())


def _idefics2(batch):
    import transformers as tf

    perceiver = dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8,
                     num_key_value_heads=1)
    return _plain(tf.Idefics2ForConditionalGeneration, tf.Idefics2Config, 4, batch,
                  _pix(1, 3, 32, 32, pixel_attention_mask=lambda b: torch.ones(b, 1, 32, 32, dtype=torch.bool)),
                  vision_config=dict(SIGLIP), perceiver_config=perceiver, text_config=tf.MistralConfig(**TEXT), image_token_id=IMG)


def _got_ocr2(batch, Cfg="GotOcr2Config"):
    import transformers as tf

    return _plain(tf.GotOcr2ForConditionalGeneration, getattr(tf, Cfg), 1, batch, _pix(3, 64, 64),
                  vision_config=dict(SAM), text_config=tf.Qwen2Config(**TEXT), image_token_index=IMG)


def _deepseek_vl(batch, hybrid=False):
    import transformers as tf

    if hybrid:
        return _plain(tf.DeepseekVLHybridForConditionalGeneration, tf.DeepseekVLHybridConfig, 16, batch,
                      _pix(3, 32, 32, high_res_pixel_values=lambda b: torch.randn(b, 3, 64, 64)),
                      vision_config=dict(SIGLIP), high_res_vision_config=dict(SAM), text_config=dict(TEXT), image_token_id=IMG)
    return _plain(tf.DeepseekVLForConditionalGeneration, tf.DeepseekVLConfig, 16, batch, _pix(3, 32, 32),
                  vision_config=dict(SIGLIP), text_config=dict(TEXT), image_token_id=IMG)


def _deepseek_ocr2(batch):
    """DeepSeek-OCR 2: SAM features read by a fixed set of 144 learned queries (a Qwen2 encoder), then a
    view separator: 145 image tokens per 64x64 image (no local crops). DeepSeek-V2 text with plain
    multi-head attention (its config drops the latent-attention fields) and dense MLPs."""
    import transformers as tf

    text = {k: v for k, v in TEXT.items() if k != "head_dim"}
    vision = dict(sam_config=dict(SAM, downsample_channels=[16, 32]), encoder_config=dict(TEXT, vocab_size=8))
    return _plain(tf.DeepseekOcr2ForConditionalGeneration, tf.DeepseekOcr2Config, 145, batch, _pix(3, 64, 64),
                  text_config=dict(text, mlp_layer_types=["dense", "dense"]), vision_config=vision, image_token_id=IMG)


def _unlimited_ocr(batch, window=128):
    """Unlimited-OCR: a 128x128 global view through SAM (8x8 patches, two stride-2 necks: 2x2) and a CLIP
    encoder, 2x2 features + a newline per row + a view separator = 7 image tokens; DeepSeek-V2 text whose
    layers all use the reference sliding window (the prompt's keys always, generated keys within
    ``window``)."""
    import transformers as tf

    text = {k: v for k, v in TEXT.items() if k != "head_dim"}
    vision = dict(sam_config=dict(SAM, image_size=128, downsample_channels=[16, 32]),
                  encoder_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=28, patch_size=14))
    return _plain(tf.UnlimitedOcrForConditionalGeneration, tf.UnlimitedOcrConfig, 7, batch, _pix(3, 128, 128),
                  text_config=dict(text, mlp_layer_types=["dense", "dense"], sliding_window=window), vision_config=vision,
                  image_token_id=IMG)


def _janus(batch):
    import transformers as tf

    vq = dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1], num_res_blocks=1, projection_dim=32,
              image_token_embed_dim=32, num_patches=4, latent_channels=8)
    return _plain(tf.JanusForConditionalGeneration, tf.JanusConfig, 16, batch, _pix(3, 32, 32),
                  vision_config=dict(SIGLIP, projection_dim=32, depth=1), text_config=dict(TEXT), vq_config=vq, image_token_id=IMG)


def _ovis2(batch):
    import transformers as tf

    vision = dict(SIGLIP, hidden_stride=2, vocab_size=16, num_visual_indicator_tokens=5)
    return _plain(tf.Ovis2ForConditionalGeneration, tf.Ovis2Config, 4, batch, _pix(3, 32, 32),
                  vision_config=vision, text_config=dict(TEXT), image_token_id=IMG, visual_indicator_token_ids=[80, 81, 82, 83, 84],
                  vocab_size=VOCAB, hidden_size=32)


def _aria(batch):
    import transformers as tf

    text = dict(TEXT, moe_num_experts=2, moe_topk=1, moe_num_shared_experts=1, model_type="aria_text")
    return _plain(tf.AriaForConditionalGeneration, tf.AriaConfig, 4, batch,
                  _pix(3, 32, 32, pixel_mask=lambda b: torch.ones(b, 32, 32, dtype=torch.bool)),
                  vision_config=dict(SIGLIP), text_config=text, projector_patch_to_query_dict={16: 4}, image_token_index=IMG)


def _fuyu(batch):
    import transformers as tf

    def pixels(b):
        return {"pixel_values": torch.randn(b, 16, 3 * 8 * 8)}
    return _plain(tf.FuyuForCausalLM, tf.FuyuConfig, 16, batch, pixels, text_config=dict(TEXT, model_type="persimmon"),
                  vocab_size=VOCAB, hidden_size=32, patch_size=8, num_channels=3, image_token_id=IMG)


def _cohere2_vision(batch):
    import transformers as tf

    return _plain(tf.Cohere2VisionForConditionalGeneration, tf.Cohere2VisionConfig, 4, batch, _pix(3, 32, 32),
                  vision_config=dict(SIGLIP), text_config=dict(TEXT, **WINDOWED, model_type="cohere2"), image_token_id=IMG,
                  downsample_factor=2)


def _shieldgemma2(batch):
    import transformers as tf

    model, inputs = _plain(tf.Gemma3ForConditionalGeneration, tf.ShieldGemma2Config, 4, batch, _pix(3, 32, 32),
                           vision_config=dict(SIGLIP), text_config=dict(TEXT, **WINDOWED, query_pre_attn_scalar=8),
                           image_token_index=IMG, mm_tokens_per_image=4, boi_token_index=85, eoi_token_index=86)
    _randomise_projector(model)
    return model, inputs


def _lighton_ocr(batch):
    import transformers as tf

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                  head_dim=16)
    return _plain(tf.LightOnOcrForConditionalGeneration, tf.LightOnOcrConfig, 4, batch,
                  _pix(3, 32, 32, image_sizes=lambda b: torch.tensor([[32, 32]] * b)),
                  vision_config=vision, text_config=dict(TEXT), image_token_id=IMG, spatial_merge_size=2)


def _randomise_projector(model):
    for p in model.model.multi_modal_projector.parameters():  # initialised to zeros: the image would not matter
        if p.ndim == 2:
            torch.nn.init.normal_(p, std=0.5)


# -- multimodal RoPE families: [vision start][image x n][vision end], flattened patches + grid ------
ROPE3D = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
QWEN3_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, temporal_patch_size=2,
                    spatial_merge_size=2, out_hidden_size=32, num_position_embeddings=16, deepstack_visual_indexes=[0])
GLM_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=32, image_size=16)
GLM_TEXT = dict(TEXT, head_dim=16, rope_parameters=dict(ROPE3D, partial_rotary_factor=0.5))
TINY_MOE = dict(moe_intermediate_size=16, num_experts_per_tok=1)
AUDIO = dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16, output_dim=32)


def _mrope(Model, Cfg, batch, text, vision, markers=("vision_start_token_id", "vision_end_token_id"), patch=(3 * 2 * 4 * 4,),
           **cfg):
    """A 3D-RoPE family with one 4x4-patch image (4 tokens after the 2x2 merge) per row."""
    cfg = Cfg(text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=87, **{markers[0]: 88, markers[1]: 89}, **cfg)
    n = 4
    ids, am = _ids(n + 2, batch, pre=torch.cat([torch.tensor([88]), torch.full((n,), IMG), torch.tensor([89])]))
    inputs = dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(batch * 16, *patch),
                  image_grid_thw=torch.tensor([[1, 4, 4]] * batch))
    if "mm_token_type_ids" in inspect.signature(Model.forward).parameters:  # not the omni thinkers
        inputs["mm_token_type_ids"] = (ids == IMG).long()
    return Model(cfg), inputs


def _glm4v(batch, which):
    import transformers as tf

    Model, Cfg, text = {
        "glm4v": (tf.Glm4vForConditionalGeneration, tf.Glm4vConfig, GLM_TEXT),
        "glm46v": (tf.Glm46VForConditionalGeneration, tf.Glm46VConfig, GLM_TEXT),
        "glm_ocr": (tf.GlmOcrForConditionalGeneration, tf.GlmOcrConfig, GLM_TEXT),
        "glmga": (tf.Glm46VForConditionalGeneration, tf.GlmgaConfig, GLM_TEXT),  # transformers maps glmga to GLM-4.6V's model
        "glm4v_moe": (tf.Glm4vMoeForConditionalGeneration, tf.Glm4vMoeConfig,
                      dict(GLM_TEXT, **TINY_MOE, n_shared_experts=1, n_routed_experts=2, first_k_dense_replace=1, n_group=1,
                           topk_group=1)),
    }[which]
    return _mrope(Model, Cfg, batch, text, dict(GLM_VISION), markers=("image_start_token_id", "image_end_token_id"))


def _cosmos3_edge(batch):
    """Cosmos3 Edge: SigLIP2-style flattened 4x4 patches (no temporal patch), Qwen2-VL 3D RoPE."""
    import transformers as tf

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=4, num_patches=16,
                  spatial_merge_size=2)
    return _mrope(tf.Cosmos3EdgeForConditionalGeneration, tf.Cosmos3EdgeConfig, batch, dict(TEXT, rope_parameters=dict(ROPE3D)),
                  vision, patch=(3 * 4 * 4,), projector_hidden_size=64)


def _cohere_compass(batch):
    """Cohere North Vision: Qwen3-VL's vision and 3D RoPE (per layer type), Cohere 2 text, layer 0
    sliding-window."""
    import transformers as tf

    rope = dict(ROPE3D, mrope_interleaved=True)
    text = dict(TEXT, **WINDOWED, rope_parameters={"sliding_attention": rope, "full_attention": rope}, logit_scale=1.0)
    return _mrope(tf.CohereCompassForConditionalGeneration, tf.CohereCompassConfig, batch, text, dict(QWEN3_VISION))


def _qwen3_vl_moe(batch):
    import transformers as tf

    text = dict(TEXT, **TINY_MOE, num_experts=2, rope_parameters=dict(ROPE3D, mrope_interleaved=True))
    return _mrope(tf.Qwen3VLMoeForConditionalGeneration, tf.Qwen3VLMoeConfig, batch, text, dict(QWEN3_VISION))


def _ernie4_5_vl_moe(batch):
    import transformers as tf

    text = dict(TEXT, rope_parameters=dict(ROPE3D), moe_intermediate_size=[16, 16], moe_k=1, moe_num_experts=2,
                moe_num_shared_experts=1, mlp_layer_types=["dense", "sparse"])
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_merge_size=2)
    return _mrope(tf.Ernie4_5_VLMoeForConditionalGeneration, tf.Ernie4_5_VLMoeConfig, batch, text, vision,
                  markers=("image_start_token_id", "image_end_token_id"), patch=(3 * 4 * 4,))


def _paddleocr_vl(batch):
    import transformers as tf

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4,
                  spatial_merge_size=2)
    return _mrope(tf.PaddleOCRVLForConditionalGeneration, tf.PaddleOCRVLConfig, batch, dict(TEXT, rope_parameters=dict(ROPE3D)), vision,
                  patch=(3, 4, 4))


def _omni_thinker(batch, which):
    import transformers as tf

    if which == "qwen2_5_omni_thinker":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, temporal_patch_size=2,
                      spatial_merge_size=2, out_hidden_size=32, window_size=16, fullatt_block_indexes=[0])
        return _mrope(tf.Qwen2_5OmniThinkerForConditionalGeneration, tf.Qwen2_5OmniThinkerConfig, batch,
                      dict(TEXT, rope_parameters=dict(ROPE3D)), vision, audio_config=dict(AUDIO))
    text = dict(TEXT, **TINY_MOE, num_experts=2, rope_parameters=dict(ROPE3D, mrope_interleaved=True))
    return _mrope(tf.Qwen3OmniMoeThinkerForConditionalGeneration, tf.Qwen3OmniMoeThinkerConfig, batch, text, dict(QWEN3_VISION),
                  audio_config=dict(AUDIO, downsample_hidden_size=8))


# -- hybrid stacks: only some decoder layers are attention (two attention layers, as everywhere) -----
LINEAR_ATTN = dict(linear_conv_kernel_dim=2, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                   linear_num_value_heads=4)


def _qwen3_5(batch, moe=False):
    import transformers as tf

    text = dict(TEXT, num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "full_attention"], **LINEAR_ATTN,
                rope_parameters=dict(ROPE3D, mrope_interleaved=True))
    vision = {k: v for k, v in QWEN3_VISION.items() if k != "deepstack_visual_indexes"}
    if moe:
        text = dict(text, **TINY_MOE, num_experts=2, shared_expert_intermediate_size=16)
        return _mrope(tf.Qwen3_5MoeForConditionalGeneration, tf.Qwen3_5MoeConfig, batch, text, vision)
    return _mrope(tf.Qwen3_5ForConditionalGeneration, tf.Qwen3_5Config, batch, text, vision)


def _lfm2_vl(batch):
    import transformers as tf

    text = dict(TEXT, num_hidden_layers=3, layer_types=["full_attention", "conv", "full_attention"], conv_L_cache=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8, num_patches=16)
    pixels = _pix(16, 3 * 8 * 8, spatial_shapes=lambda b: torch.tensor([[4, 4]] * b),
                  pixel_attention_mask=lambda b: torch.ones(b, 16, dtype=torch.bool))
    return _plain(tf.Lfm2VlForConditionalGeneration, tf.Lfm2VlConfig, 4, batch, pixels, vision_config=vision, text_config=text,
                  image_token_id=IMG, downsample_factor=2, projector_hidden_size=32)


def _minicpmv4_6(batch, ocr=False):
    """MiniCPM-V 4.6: each image is 8x8 patches of 2x2 pixels, merged 16x into 4 image tokens (MiniCPM-OCR:
    4x4 patches merged 4x); its processor packs every image's patches side by side into one pixel row
    ([1, 3, 2, 2 * patches * batch]). Hybrid Qwen3.5 text (layer 0 gated delta-net)."""
    import transformers as tf

    text = dict(TEXT, num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "full_attention"], **LINEAR_ATTN)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=2, image_size=16)
    side = 4 if ocr else 8

    def pixels(b):
        return dict(pixel_values=torch.randn(1, 3, 2, 2 * side * side * b), target_sizes=torch.tensor([[side, side]] * b))
    Model, Cfg, extra = ((tf.MiniCPMOcrForConditionalGeneration, tf.MiniCPMOcrConfig, {}) if ocr else
                         (tf.MiniCPMV4_6ForConditionalGeneration, tf.MiniCPMV4_6Config, dict(image_size=16)))
    return _plain(Model, Cfg, 4, batch, pixels, text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=87,
                  insert_layer_id=0, **extra)


def _minicpmv4_7(batch):
    """MiniCPM-V 4.7: MiniCPM-V 4.6's model (8x8 patches -> 4 image tokens, packed pixels, hybrid text)
    with canvas 3D RoPE laid out from the <image>...</image> markers around each crop."""
    import transformers as tf

    text = dict(TEXT, num_hidden_layers=3, layer_types=["linear_attention", "full_attention", "full_attention"], **LINEAR_ATTN,
                rope_parameters=dict(ROPE3D, mrope_interleaved=True))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=2, image_size=16)
    cfg = tf.MiniCPMV4_7Config(text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=87, insert_layer_id=0,
                               image_size=16, image_start_id=88, image_end_id=89, slice_start_id=85, slice_end_id=86, newline_id=84)
    ids, am = _ids(6, batch, pre=torch.cat([torch.tensor([88]), torch.full((4,), IMG), torch.tensor([89])]))
    return tf.MiniCPMV4_7ForConditionalGeneration(cfg), dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(1, 3, 2, 2 * 64 * batch),
                                                            target_sizes=torch.tensor([[8, 8]] * batch), mm_token_type_ids=(ids == IMG).long())


def _nemotron_h_omni(batch):
    """Nemotron 3 Nano Omni: RADIO vision (16 flattened 4x4 patches per image, pixel shuffle 0.5 into 4
    image tokens), hybrid Nemotron-H text: a Mamba-2 layer (its decode kernels write their state in
    place), two attention layers without positional encoding, a MoE layer."""
    import transformers as tf

    text = dict({k: v for k, v in TEXT.items() if k != "max_position_embeddings"}, num_hidden_layers=4,
                layer_types=["linear_attention", "full_attention", "full_attention", "moe"], ssm_state_size=8, mamba_num_heads=4,
                mamba_head_dim=8, n_groups=2, conv_kernel=2, chunk_size=4, n_routed_experts=2, num_experts_per_tok=1,
                moe_intermediate_size=16, moe_shared_expert_intermediate_size=16)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2.0, patch_size=4, image_size=16,
                  max_img_size=32, num_cls_tokens=1, num_registers=1, video_temporal_patch_size=2)

    def pixels(b):
        return dict(pixel_values=torch.randn(b * 16, 3 * 4 * 4), image_grid_hw=torch.tensor([[4, 4]] * b))
    return _plain(tf.NemotronH_Omni_Reasoning_V3, tf.NemotronH_Omni_Reasoning_V3_Config, 4, batch, pixels, text_config=text,
                  vision_config=vision, image_token_id=IMG, vision_hidden_size=32, projector_hidden_size=32)


def _lfm3_vl(batch):
    import transformers as tf

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    text = dict(TEXT, num_hidden_layers=3, layer_types=["conv", "full_attention", "sliding_attention"], conv_L_cache=3,
                sliding_window=8, rope_parameters={"sliding_attention": rope, "full_attention": rope})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, layer_types=["conv", "full_attention"],
                  conv_kernel_size=3)
    return _mrope(tf.Lfm3VlForConditionalGeneration, tf.Lfm3VlConfig, batch, text, vision)


def _blip2(batch):
    """BLIP-2 as transformers 5 runs it: the Q-Former's query outputs sit at image-token positions of
    the OPT decoder's input (self-attention over image tokens)."""
    import transformers as tf

    qformer = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32)
    text = dict(TEXT, model_type="opt", ffn_dim=64, word_embed_proj_dim=32, enable_bias=True)
    return _plain(tf.Blip2ForConditionalGeneration, tf.Blip2Config, 4, batch, _pix(3, 32, 32), vision_config=dict(SIGLIP),
                  qformer_config=qformer, text_config=text, num_query_tokens=4, image_token_index=IMG)


def _llama4(batch):
    """Llama 4: MoE text model; layer 0 chunked attention (chunks of 8 tokens from the first real one:
    the last tokens' chunk holds only the last image token) with RoPE and QK L2 norm, layer 1 full
    attention without RoPE (NoPE). 4 image tokens (4x4 patches, pixel shuffle 0.5)."""
    import transformers as tf

    from headsteer import get_adapter

    text = dict(TEXT, intermediate_size_mlp=64, num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=1,
                no_rope_layers=[1, 0], attention_chunk_size=8)
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                  vision_output_dim=32, projector_input_dim=32, projector_output_dim=32, pixel_shuffle_ratio=0.5, rope_theta=10000)
    model, inputs = _plain(tf.Llama4ForConditionalGeneration, tf.Llama4Config, 4, batch, _pix(3, 32, 32), text_config=text,
                           vision_config=vision, image_token_index=IMG, boi_token_index=85, eoi_token_index=86)
    get_adapter(model)  # adds the work-around for transformers 5.24's Llama 4 forward (headsteer/compat.py)
    return model, inputs


def _instructblip(batch):
    """InstructBLIP as transformers 5 runs it: like BLIP-2, the Q-Former's query outputs sit at
    image-token positions of the decoder's input (a Llama decoder here, as in InstructBLIP-Vicuna), and
    the Q-Former also reads the instruction (qformer_input_ids).

    Two defaults of a random init keep the image from the answer: the vision config's
    initializer_range (1e-10) makes the tower's output ~0 for every image, and at the Q-Former's 0.02
    its cross-attention is near-uniform, so the queries average the patches away (the logits moved
    by < 1e-4 between images)."""
    import transformers as tf

    qformer = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32,
                   initializer_range=0.2)
    model, inputs = _plain(tf.InstructBlipForConditionalGeneration, tf.InstructBlipConfig, 4, batch, _pix(3, 32, 32),
                           vision_config=dict(SIGLIP, initializer_range=0.02), qformer_config=qformer,
                           text_config=dict(TEXT, model_type="llama"), num_query_tokens=4, image_token_index=IMG)
    qids = torch.randint(3, 80, (batch, 5), generator=torch.Generator().manual_seed(4))
    return model, dict(inputs, qformer_input_ids=qids, qformer_attention_mask=torch.ones_like(qids))



BUILDERS = {
    "llava": _llava,
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "llava_onevision1_5": _llava_onevision1_5,
    "granite4_vision": _granite4_vision,
    "qwen2_vl": lambda b: _qwen_vl(b, "qwen2_vl"),
    "qwen2_5_vl": lambda b: _qwen_vl(b, "qwen2_5_vl"),
    "qwen3_vl": lambda b: _qwen_vl(b, "qwen3_vl"),
    "cosmos3_omni": lambda b: _qwen_vl(b, "cosmos3_omni"),
    "idefics3": _idefics3,
    "smolvlm": lambda b: _idefics3(b, smol=True),
    "granite_docling": _granite_docling,
    "gemma3": _gemma3,
    "paligemma": _paligemma,
    "mistral3": _mistral3,
    "internvl": _internvl,
    "qianfan_ocr": _qianfan_ocr,
    "aya_vision": _aya,
    "vipllava": _vipllava,
    # adapter-only families added with issue 10
    "llava_next_video": _llava_next_video,
    "video_llava": _video_llava,
    "video_llama_3": _video_llama_3,
    "idefics2": _idefics2,
    "got_ocr2": _got_ocr2,
    "pp_chart2table": lambda b: _got_ocr2(b, "PPChart2TableConfig"),  # transformers maps it to GOT-OCR 2.0's model
    "deepseek_vl": _deepseek_vl,
    "deepseek_vl_hybrid": lambda b: _deepseek_vl(b, hybrid=True),
    "deepseek_ocr2": _deepseek_ocr2,
    "unlimited_ocr": _unlimited_ocr,
    "janus": _janus,
    "ovis2": _ovis2,
    "aria": _aria,
    "muse_glimmer": _muse_glimmer,
    "molmo2": _molmo2,
    "muse_spark": lambda b: _muse_glimmer(b, spark=True),
    "fuyu": _fuyu,
    "cohere2_vision": _cohere2_vision,
    "shieldgemma2": _shieldgemma2,
    "lighton_ocr": _lighton_ocr,
    "blip-2": _blip2,
    "instructblip": _instructblip,
    # multimodal RoPE
    "glm4v": lambda b: _glm4v(b, "glm4v"),
    "glm46v": lambda b: _glm4v(b, "glm46v"),
    "glmga": lambda b: _glm4v(b, "glmga"),
    "glm_ocr": lambda b: _glm4v(b, "glm_ocr"),
    "glm4v_moe": lambda b: _glm4v(b, "glm4v_moe"),
    "qwen3_vl_moe": _qwen3_vl_moe,
    "cosmos3_edge": _cosmos3_edge,
    "cohere_compass": _cohere_compass,
    "ernie4_5_vl_moe": _ernie4_5_vl_moe,
    "paddleocr_vl": _paddleocr_vl,
    "qwen2_5_omni_thinker": lambda b: _omni_thinker(b, "qwen2_5_omni_thinker"),
    "qwen3_omni_moe_thinker": lambda b: _omni_thinker(b, "qwen3_omni_moe_thinker"),
    # hybrid stacks
    "qwen3_5": _qwen3_5,
    "qwen3_5_moe": lambda b: _qwen3_5(b, moe=True),
    "lfm2_vl": _lfm2_vl,
    "lfm3_vl": _lfm3_vl,
    "minicpmv4_6": _minicpmv4_6,
    "minicpm_ocr": lambda b: _minicpmv4_6(b, ocr=True),
    "minicpmv4_7": _minicpmv4_7,
    "nemotron_h_omni": _nemotron_h_omni,
    # MoE text model with chunked-attention and NoPE layers
    "llama4": _llama4,
}
# a family newer than the installed transformers (headsteer.families.since) has no model class to build
BUILDERS = {k: v for k, v in BUILDERS.items() if k in MAPPING}
HYBRID = {"qwen3_5", "qwen3_5_moe", "lfm2_vl", "lfm3_vl", "minicpmv4_6", "minicpm_ocr", "minicpmv4_7", "nemotron_h_omni"}


# -- cross-attention families: the text reads the image only through cross-attention layers ---------
MLLAMA_VISION = dict(hidden_size=16, num_hidden_layers=1, num_global_layers=1, attention_heads=2, intermediate_size=32,
                     vision_output_dim=32, image_size=16, patch_size=8, max_num_tiles=2, intermediate_layers_indices=[0],
                     supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
MLLAMA_TEXT = dict(TEXT, num_hidden_layers=4, cross_attention_layers=[1, 3])
MLLAMA_KEYS = 2 * (2 * 2 + 1)  # cross-attention keys per image: 2 tiles (one of them padding) x (2x2 patches + class)


def mllama_cross_mask(ids, image_tiles=1, max_tiles=2):
    """The cross-attention mask as MllamaProcessor makes it: every token from the ``<|image|>`` token on
    reads the image's real tiles; earlier tokens (and left pads) read none (rows masked out)."""
    B, T = ids.shape
    m = torch.zeros(B, T, 1, max_tiles, dtype=torch.long)
    for b in range(B):
        start = int((ids[b] == IMG).nonzero()[0])
        m[b, start:, 0, :image_tiles] = 1
    return m


def _mllama(batch):
    """Llama 3.2 Vision: 4 text layers of which 1 and 3 are cross-attention layers; one 16x16 image tile
    per prompt out of 2 (the second a padding tile, masked by aspect_ratio_mask and the cross mask)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    cfg = MllamaConfig(vision_config=MLLAMA_VISION, text_config=MLLAMA_TEXT, image_token_index=IMG)
    model = MllamaForConditionalGeneration(cfg)
    with torch.no_grad():
        for layer in model.model.language_model.layers:  # gates start at 0 (tanh 0): the image would not matter
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(1.0)
                layer.cross_attn_mlp_gate.fill_(0.5)
    ids, am = _ids(1, batch)
    return model, dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(batch, 1, 2, 3, 16, 16),
                       aspect_ratio_ids=torch.ones(batch, 1, dtype=torch.long),
                       aspect_ratio_mask=torch.tensor([[[1, 0]]] * batch), cross_attention_mask=mllama_cross_mask(ids))


def idefics_image_mask(ids):
    """IDEFICS's image_attention_mask as its processor makes it: tokens from ``<image>`` on read the image."""
    return torch.stack([(torch.arange(ids.shape[1]) >= int((row == IMG).nonzero()[0])).long() for row in ids])[:, :, None]


IDEFICS_KEYS = 2 * 2 + 1  # cross-attention keys per image: 2x2 patches + class


def _idefics(batch):
    """IDEFICS (v1): 4 decoder layers, a gated cross-attention block before layers 0 and 2, per-channel
    gates, q/k layer norms, no perceiver; one 16x16 image per prompt."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    text = {k: v for k, v in TEXT.items() if k not in ("num_key_value_heads", "head_dim", "max_position_embeddings")}
    cfg = IdeficsConfig(**dict(text, num_hidden_layers=4), cross_layer_interval=2, alpha_initializer="ones", alpha_type="vector",
                        qk_layer_norms=True, use_resampler=False, freeze_text_layers=False, freeze_vision_layers=False,
                        vision_config=dict(embed_dim=16, image_size=16, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=32))
    ids, am = _ids(1, batch)
    return IdeficsForVisionText2Text(cfg), dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(batch, 1, 3, 16, 16),
                                                image_attention_mask=idefics_image_mask(ids))


CROSS_BUILDERS = {"mllama": _mllama, "idefics": _idefics}


def tiny(family: str, batch: int = 2, seed: int = 0):
    """(model in eval mode, batch dict) for a family."""
    torch.manual_seed(seed)
    model, inputs = {**BUILDERS, **CROSS_BUILDERS}[family](batch)
    return model.eval(), inputs


def other_pixels(inputs, seed=1):
    """The same batch with different random pixels."""
    g = torch.Generator().manual_seed(seed)
    out = dict(inputs)
    for k, v in inputs.items():
        if "pixel_values" in k:
            out[k] = torch.randn(v.shape, generator=g)
    return out


MHA = {"fuyu", "blip-2"}  # families whose text model has one KV head per query head (no GQA to test)
SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def alone_row(family, inputs, b):
    """Row ``b`` of a left-padded batch as its own unpadded batch of one."""
    keep = inputs["attention_mask"][b].bool()
    out = {}
    for k, v in inputs.items():
        if k in SEQ_KEYS or k in ("cross_attention_mask", "image_attention_mask"):
            out[k] = v[b : b + 1][:, keep]
        elif k == "pixel_values" and ("image_grid_thw" in inputs or "image_grid_hw" in inputs):  # flattened patches of every image
            sizes = inputs.get("image_grid_thw", inputs.get("image_grid_hw")).prod(-1).tolist()
            start = sum(sizes[:b])
            out[k] = v[start : start + sizes[b]]
        elif k == "pixel_values" and "target_sizes" in inputs:  # MiniCPM-V: every image's patches packed along the width
            widths = (inputs["target_sizes"].prod(-1) * v.shape[-2]).tolist()  # patches x patch width (square patches)
            start = sum(widths[:b])
            out[k] = v[..., start : start + widths[b]]
        elif k == "image_token_pooling":  # Molmo2: per image token, indices into the image's (or the batch's) patches
            grids = inputs["image_grids"]
            tokens = (grids[:, 0] * grids[:, 1] + grids[:, 2] * grids[:, 3]).tolist()
            patches = 0 if molmo2_pooling_per_image() else inputs["pixel_values"].shape[1] * inputs["pixel_values"].shape[2]
            start = sum(tokens[:b])
            rows = v[start : start + tokens[b]]
            out[k] = torch.where(rows >= 0, rows - b * patches, rows)  # -1 marks a padding slot
        elif torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == inputs["input_ids"].shape[0]:
            out[k] = v[b : b + 1]
        else:
            out[k] = v
    return out
