"""The family registry: the image-text-to-text model types headsteer supports (``FAMILIES``, and
``CROSS_FAMILIES`` whose text reads the image through cross-attention layers), those it refuses and
why (``REFUSED``), and the few facts in which supported families differ — positions, prompts, how
their processors are called. ``Adapter`` (headsteer/adapters.py) reads these tables; a family is one
entry in each table that concerns it, never a branch elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import HeadsteerError

# model_type -> notes; every one is tested on a tiny random model (tests/tiny_models.py).
FAMILIES = {
    "llava": "LLaVA-1.5",
    "llava_next": "LLaVA-NeXT",
    "granite4_vision": "Granite 4 Vision (LLaVA-NeXT layout, window Q-Former projector, DeepStack at image positions)",
    "llava_onevision": "LLaVA-OneVision",
    "llava_onevision1_5": "LLaVA-OneVision-1.5 (RICE ViT, Qwen3 text with 1D positions)",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "cosmos3_omni": "Cosmos3 (understanding path; Qwen3-VL layout)",
    "cosmos3_edge": "Cosmos3 Edge (SigLIP2 vision, Qwen2-VL 3D RoPE layout)",
    "cohere_compass": "Cohere North Vision (Qwen3-VL layout, Cohere 2 text with sliding-window layers)",
    "idefics3": "Idefics3",
    "smolvlm": "SmolVLM",
    "granite_docling": "Granite-Docling (Idefics3 layout, DeepStack features added at image positions, Granite text)",
    "gemma3": "Gemma 3",
    "paligemma": "PaliGemma",
    "mistral3": "Mistral 3 (Pixtral vision)",
    "internvl": "InternVL (transformers-native)",
    "qianfan_ocr": "Qianfan-OCR (InternVL layout, Qwen3 text)",
    "aya_vision": "Aya Vision",
    "vipllava": "VipLLaVA",
    "llava_next_video": "LLaVA-NeXT-Video",
    "video_llava": "Video-LLaVA",
    "video_llama_3": "VideoLLaMA3 (Qwen2 text, 1D positions)",
    "idefics2": "Idefics2",
    "got_ocr2": "GOT-OCR 2.0",
    "pp_chart2table": "PP-Chart2Table (transformers runs it with GOT-OCR 2.0's classes)",
    "deepseek_vl": "DeepSeek-VL",
    "deepseek_vl_hybrid": "DeepSeek-VL hybrid (SigLIP + SAM towers)",
    "deepseek_ocr2": "DeepSeek-OCR 2 (SAM + Qwen2 query encoder; multi-head attention text)",
    "unlimited_ocr": ("Unlimited-OCR (SAM + CLIP encoder; DeepSeek-V2 text with reference sliding-window attention: every "
                      "prompt key, and the last sliding_window generated keys)"),
    "janus": "Janus (understanding path)",
    "ovis2": "Ovis2",
    "aria": "Aria (MoE text model)",
    "muse_glimmer": "Muse Glimmer (gated attention, sliding-window layers)",
    "molmo2": "Molmo2 (pooled patch tokens; image tokens attend to each other bidirectionally)",
    "muse_spark": "Muse Spark (image input; as Muse Glimmer with per-head output norm, MoE text model)",
    "fuyu": "Fuyu (patches fed straight to the decoder)",
    "cohere2_vision": "Command A Vision (sliding window)",
    "shieldgemma2": "ShieldGemma 2",
    "lighton_ocr": "LightOnOCR",
    "blip-2": "BLIP-2 (Q-Former queries at image-token positions of the decoder; needs image_token_index)",
    "instructblip": "InstructBLIP (as BLIP-2; the Q-Former also reads the instruction)",
    "glm4v": "GLM-4.1V / GLM-4.5V text (3D RoPE)",
    "glm46v": "GLM-4.6V",
    "glm4v_moe": "GLM-4.5V (MoE)",
    "glm_ocr": "GLM-OCR (GLM-4.1V layout)",
    "glmga": "GLM (glmga config run by transformers' GLM-4.6V model classes)",
    "qwen3_vl_moe": "Qwen3-VL MoE",
    "ernie4_5_vl_moe": "ERNIE 4.5 VL (MoE)",
    "paddleocr_vl": "PaddleOCR-VL",
    "qwen2_5_omni_thinker": "Qwen2.5-Omni thinker (image/video input)",
    "qwen3_omni_moe_thinker": "Qwen3-Omni thinker (image/video input)",
    "qwen3_5": "Qwen3.5 (hybrid: gated delta-net + attention layers)",
    "qwen3_5_moe": "Qwen3.5 MoE (hybrid)",
    "lfm2_vl": "LFM2-VL (hybrid: short convolutions + attention layers)",
    "lfm3_vl": "LFM3-VL (hybrid)",
    "minicpmv4_6": "MiniCPM-V 4.6 (hybrid Qwen3.5 text: gated delta-net + attention layers; 1D positions)",
    "minicpm_ocr": "MiniCPM-OCR (MiniCPM-V 4.6's model, 4x downsampling)",
    "minicpmv4_7": "MiniCPM-V 4.7 (as 4.6, with canvas 3D RoPE computed from the token layout)",
    "nemotron_h_omni": "Nemotron 3 Nano Omni (hybrid Nemotron-H text: Mamba-2 + attention layers without RoPE; image input)",
    "llama4": "Llama 4 (MoE text model, chunked-attention and NoPE layers, QK L2 norm)",
}

# Model types that exist only from a transformers release on (headsteer's range also holds older ones): on an
# older release they are neither supported nor refused here, since transformers cannot load them at all.
SINCE = {"llava_onevision1_5": "5.25", "ovis2_5": "5.25", "pi05": "5.25"}


@dataclass(frozen=True)
class CrossFamily:
    """Where a cross-attention family keeps its cross-attention layers."""

    notes: str
    blocks: str  # attribute of the language model: the list holding the cross-attention blocks
    module: str  # attribute of a block: its attention module
    gate: str  # attribute of a block: the gate (the block adds tanh(gate) x the attention output)
    image_token: str  # the prompt's image placeholder, where the config names no image token id


# Families whose text reads the image only through cross-attention layers (keys/values from the
# vision features). Mllama interleaves them with the decoder layers; IDEFICS keeps them in a list of
# their own, block i running before decoder layer i x cross_layer_interval.
CROSS_FAMILIES = {
    "mllama": CrossFamily("Llama 3.2 Vision (cross-attention layers)", "layers", "cross_attn", "cross_attn_attn_gate", "<|image|>"),
    "idefics": CrossFamily("IDEFICS (v1; gated cross-attention blocks)", "gated_cross_attn_layers", "cross_attn",
                           "alpha_cross_attn", "<image>"),
}

# Image-text-to-text families refused, and why (checked before any weight loads).
_VQ = "image VQ codes are part of the vocabulary; there are no image positions to ablate"
_ENC_DEC = "encoder-decoder: the text decoder reads the image through cross-attention to an encoder, not through image positions"
# Their checkpoints' vision towers are timm models (config model_type "timm_wrapper").
_TIMM = "its vision tower is a timm model (timm_wrapper), and headsteer does not depend on timm"
# DeepSeek-V3-style multi-head latent attention with the released head sizes: keys carry no-rope +
# rope dims, more than the values' v_head_dim (e.g. 192 vs 128), while the K/V baselines and
# ablation place one head size for both (a tiny Kimi K2.5 fails there).
_MLA = ("multi-head latent attention with key heads wider than value heads (qk_nope_head_dim + qk_rope_head_dim > "
        "v_head_dim); headsteer's K/V baselines assume one head size for keys and values")
# Sparse attention (DeepSeek DSA, MiniMax block-sparse, Qwen4 QSA): a learned indexer picks, per query,
# the top-k keys or key blocks its layer reads.
_DSA = ("sparse attention: a learned indexer picks the top-k keys (or key blocks) each query reads, a key "
        "selection headsteer's per-head K/V ablation does not model")
_POSITION_MASK = ("image positions are marked by image_embeds_position_mask, not by one image token id "
                  "(the processor writes a different placeholder id at each image position)")
# Their generation step recomputes positions from the cache length, padding included (a tiny EXAONE 4.5
# fails the cached-generation invariant under ablation).
_ACTIONS = "an action model (flow-matching action expert over robot state/action embeddings): there is no answer token to attribute"
_GEN_POSITIONS = ("its prepare_inputs_for_generation drops position_ids (transformers 5.24-5.25), so the decoding steps of "
                  "a left-padded batch count the padding while the prompt's positions do not; not supported yet")
# Per-layer head geometry: headsteer numbers heads as one [layers x heads] grid of one head size.
_PER_LAYER_HEADS = ("its sliding-window layers can have another number of query heads{} than its full-attention "
                    "layers, and headsteer numbers heads as one [layers x heads] grid")
_GLOBAL_HEAD_DIM = ("its full-attention layers have another head size (global_head_dim) and can have another number of "
                    "KV heads than its sliding-window layers, and headsteer numbers heads as one [layers x heads] grid "
                    "of one head size")
_CROSS = ("image information reaches the text through cross-attention layers, not through image positions; "
          "cross-attention head ablation is built for mllama and idefics only so far")
REFUSED = {
    "chameleon": _VQ,
    "emu3": _VQ,
    "florence2": _ENC_DEC,
    "pix2struct": _ENC_DEC,
    "udop": _ENC_DEC,
    "t5gemma2": _ENC_DEC,
    "vision-encoder-decoder": _ENC_DEC,
    "blip": _CROSS,
    "pp_formulanet": _ENC_DEC,
    "evolla": ("a protein-text model: protein sequences (not images) reach the text through cross-attention "
               "(sequence aligner) layers; there are no image positions"),
    "fast_vlm": _TIMM,
    "perception_lm": _TIMM,
    "kimi_k25": _MLA,
    "hy_v4_vl": _MLA,
    "dots3_note": _MLA,
    "mistral_large4": _DSA,
    "glm5_next": _DSA,
    "minimax_m3_vl": _DSA,
    "qwen4_exp": _DSA,
    "mistral4": ("transformers maps it to Mistral4ForCausalLM, a text-only model: no vision tower and no pixel inputs, "
                 "so no image positions"),
    "apertus1p5": _VQ,
    "git": ("its image features are prepended to the token embeddings (no image-token positions in input_ids) and "
            "attend to each other bidirectionally"),
    "kosmos-2": _POSITION_MASK,
    "kosmos-2.5": _POSITION_MASK,
    "hunyuan_vl": ("transformers 5.24's HunYuanVLModel.get_rope_index counts the image-index RoPE axis across the whole "
                   "batch (row b's image gets index b), so a row in a batch differs from the same prompt alone; not "
                   "supported yet"),
    "exaone4_5": _GEN_POSITIONS,
    "hyperclovax_vision_v2": _GEN_POSITIONS,
    "step3p7": _PER_LAYER_HEADS.format(" (num_sliding_attention_heads)"),
    "inkling_mm_model": _PER_LAYER_HEADS.format(" and head size (swa_num_attention_heads, swa_head_dim)"),
    "inkling2": _PER_LAYER_HEADS.format(" and head size (swa_num_attention_heads, swa_head_dim)"),
    "inkling2_loop": _PER_LAYER_HEADS.format(" and head size (swa_num_attention_heads, swa_head_dim)"),
    "gemma4": _GLOBAL_HEAD_DIM,
    "gemma4_unified": _GLOBAL_HEAD_DIM,
    "gemma3n": _TIMM,
    "pi0": _ACTIONS,
    "pi05": _ACTIONS,
    "ovis2_5": _GEN_POSITIONS,
    "diffusion_gemma": "a block-diffusion model: the answer is a denoised block of tokens, not a next token to attribute",
    "instructblipvideo": ("transformers 5.24's InstructBlipVideoForConditionalGeneration passes the text's keyword arguments "
                          "(position ids too) into its Q-Former, which breaks the padded-batch positions headsteer gives the "
                          "language model; not supported yet (InstructBLIP is)"),
}

# Families whose processor prepends num_query_tokens image tokens to the tokenized prompt (after
# left-padding it, so a shorter prompt has its padding between the image and the text).
_PREPENDS_IMAGE = ("blip-2", "instructblip")
# Families whose processor writes the image placeholder itself and takes no chat template (IDEFICS; Fuyu puts
# |SPEAKER| before the text and <0x04> after it): the prompt is the question itself.
QUESTION_ONLY_PROMPTS = ("idefics", "fuyu", *_PREPENDS_IMAGE)

# Families whose forward derives positions from the token layout itself (3D multimodal RoPE): they
# count from each row's first real token (attention_mask) and keep the offset (rope deltas) for the
# cached steps, so headsteer passes no position ids.
OWN_POSITIONS = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "cosmos3_omni", "cosmos3_edge", "minicpmv4_7", "cohere_compass",
                 "qwen3_vl_moe", "glm4v", "glm46v", "glm4v_moe", "glmga", "glm_ocr", "ernie4_5_vl_moe", "paddleocr_vl",
                 "qwen2_5_omni_thinker", "qwen3_omni_moe_thinker", "qwen3_5", "qwen3_5_moe"}
# Families whose positions start at 1 rather than 0.
POSITION_BASE = {"paligemma": 1}
# Families whose model needs the processor's mm_token_type_ids (which tokens are image/video, for its
# 3D RoPE) but whose processor returns them only when asked (transformers 5.24's Cosmos3EdgeProcessor).
ASK_MM_TOKEN_TYPES = {"cosmos3_edge"}
# Families whose image block (every token the processor marks in mm_token_type_ids, markers included)
# attends to itself bidirectionally: the marker opening it comes before the first image token yet reads
# the image (Molmo2's <low_res_im_start>), so it counts as text that sees the image. model_type -> the
# config attributes naming those opening markers' ids.
BIDIRECTIONAL_OPENERS = {"molmo2": ("low_res_image_start_token_id", "image_start_token_id", "frame_start_token_id")}
# Families whose processor takes one list of images per prompt: a flat list of a batch's images is read
# as all images of every prompt (Gemma 3 and LFM2-VL then refuse a batch of two prompts).
NESTED_IMAGES = {"idefics3", "smolvlm", "gemma3", "mllama", "lfm2_vl", "shieldgemma2"}
# Families whose checkpoints ship no chat template but whose processor writes its own turns around
# the image: (user turn, with {image} for the processor's image token and {question}; generation prompt).
PROCESSOR_PROMPTS = {
    "got_ocr2": ("<|im_start|>system\nYou should follow the instructions carefully and explain your answers in detail."
                 "<|im_end|><|im_start|>user\n<img>{image}</img>\n{question}<|im_end|>", "<|im_start|>assistant\n"),
}
# Families whose processor's __call__ ignores ``text`` and builds its own prompts from its chat template
# (ShieldGemma 2: one chat per image x policy, the policy as the user's text). The question takes the
# policy's place: ``prompt`` renders the same chat with the question as the text, and ``encode`` hands it
# to the base ProcessorMixin.__call__ (the processor's own last step), renaming its outputs as the
# processor does. model_type -> {output name: the processor's name for it}.
OWN_PROMPT_PROCESSORS = {"shieldgemma2": {"mm_token_type_ids": "token_type_ids"}}
# Families whose chat template ignores add_generation_prompt and always ends with the model turn: that
# turn (the role tokens, then the last token).
MODEL_TURNS = {"shieldgemma2": "<start_of_turn>model\n"}


def supported_families() -> str:
    return ", ".join(sorted([*FAMILIES, *CROSS_FAMILIES]))


def check_family(model_type: str, where: str = ""):
    """One-line HeadsteerError for a model type headsteer does not support, saying why."""
    if model_type in FAMILIES or model_type in CROSS_FAMILIES:
        return
    why = REFUSED.get(model_type, "no tested adapter for it yet")
    raise HeadsteerError(f"unsupported architecture {model_type!r}{where}: {why}; supported: {supported_families()}")
