"""The family registry: one record (``Family``) per image-text-to-text model type headsteer supports,
holding every fact in which that family differs from the generic adapter — positions, prompts, how its
processor is called, its fast attribution path (or why it has none), its cross-attention layout, the
work-arounds its transformers release needs — and the types it refuses, with why (``REFUSED``).

The adapter (headsteer/adapters.py), the engine (attribution/engine.py) and the export read these
records; no model-type string appears in a branch anywhere else. A field left at its default is the
generic behaviour (the LLaVA layout). docs/families.md is generated from this file
(``python -m headsteer.families``); adding a family is one record here, one tiny-model builder in
tests/tiny_models.py and one ``ProcessorSpec`` in tests/processors_*.py (docs/contributing.md).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from .compat import llama4_image_outputs
from .errors import HeadsteerError


@dataclass(frozen=True)
class CrossLayout:
    """Where a cross-attention family keeps its cross-attention layers (its text has no image
    positions; some decoder layers read the vision features as keys/values)."""

    blocks: str  # attribute of the language model: the list holding the cross-attention blocks
    module: str  # attribute of a block: its attention module
    gate: str  # attribute of a block: the gate (the block adds tanh(gate) x the attention output)
    image_token: str  # the prompt's image placeholder, where the config names no image token id


@dataclass(frozen=True)
class Family:
    """Every fact in which one supported family differs from the generic adapter."""

    notes: str  # what it is, for people (docs/families.md)
    # -- positions
    own_positions: bool = False  # the forward derives positions from the token layout (3D RoPE): headsteer passes none
    position_base: int = 0  # positions start at this (PaliGemma: 1)
    # -- prompts and processor calls
    question_only: bool = False  # the prompt is the question itself: the processor places the image, no chat template
    no_template_prompt: tuple = ("{image}\n{question}", "")  # without a chat template: (user turn, generation prompt)
    nested_images: bool = False  # the processor takes one list of images per prompt
    ask_mm_token_types: bool = False  # the model needs mm_token_type_ids, which the processor returns only when asked
    own_prompt_outputs: dict | None = None  # its processor ignores ``text``: call ProcessorMixin.__call__ and rename these
    model_turn: str | None = None  # its template always ends with this model turn (the role tokens, then the last token)
    bidirectional_openers: tuple = ()  # config attributes naming markers that open a bidirectional image block
    # -- the fast attribution engine (attribution/engine.py)
    no_fast_path: str | None = None  # why it always takes the naive path
    suffix_embeds: bool = False  # the text after the image is embedded differently in a forward given the pixels
    # -- layout
    cross: CrossLayout | None = None  # cross-attention family: where its cross-attention layers are
    # -- work-arounds applied to a model object when its adapter is made (headsteer/compat.py)
    compat: tuple = ()
    since: str | None = None  # the transformers release that added this model type (older ones cannot load it)


_PREFIX_LM = "PaliGemma attends bidirectionally over the image and the prompt"
_PIXELS_EVERY_CALL = "its forward needs pixel_values on every call, so it cannot run the text suffix alone"
_CROSS_NAIVE = "image information reaches the text through cross-attention layers (naive path only)"
# GOT-OCR 2.0 ships no chat template; its processor writes its own turns and <img>...</img> wrapper
_GOT_OCR_TURNS = ("<|im_start|>system\nYou should follow the instructions carefully and explain your answers in detail."
                  "<|im_end|><|im_start|>user\n<img>{image}</img>\n{question}<|im_end|>", "<|im_start|>assistant\n")

FAMILIES: dict[str, Family] = {
    "llava": Family("LLaVA-1.5"),
    "llava_next": Family("LLaVA-NeXT"),
    "granite4_vision": Family("Granite 4 Vision (LLaVA-NeXT layout, window Q-Former projector, DeepStack at image positions)"),
    "llava_onevision": Family("LLaVA-OneVision"),
    "llava_onevision1_5": Family("LLaVA-OneVision-1.5 (RICE ViT, Qwen3 text with 1D positions)", since="5.25"),
    "qwen2_vl": Family("Qwen2-VL", own_positions=True),
    "qwen2_5_vl": Family("Qwen2.5-VL", own_positions=True),
    "qwen3_vl": Family("Qwen3-VL", own_positions=True),
    "cosmos3_omni": Family("Cosmos3 (understanding path; Qwen3-VL layout)", own_positions=True),
    "cosmos3_edge": Family("Cosmos3 Edge (SigLIP2 vision, Qwen2-VL 3D RoPE layout)", own_positions=True, ask_mm_token_types=True),
    "cohere_compass": Family("Cohere North Vision (Qwen3-VL layout, Cohere 2 text with sliding-window layers)", own_positions=True),
    "idefics3": Family("Idefics3", nested_images=True),
    "smolvlm": Family("SmolVLM", nested_images=True),
    "granite_docling": Family("Granite-Docling (Idefics3 layout, DeepStack features added at image positions, Granite text)"),
    "gemma3": Family("Gemma 3", nested_images=True),
    "paligemma": Family("PaliGemma", position_base=1, no_template_prompt=("{question}", ""), no_fast_path=_PREFIX_LM),
    "mistral3": Family("Mistral 3 (Pixtral vision)"),
    "internvl": Family("InternVL (transformers-native)"),
    "qianfan_ocr": Family("Qianfan-OCR (InternVL layout, Qwen3 text)"),
    "aya_vision": Family("Aya Vision"),
    "vipllava": Family("VipLLaVA"),
    "llava_next_video": Family("LLaVA-NeXT-Video"),
    "video_llava": Family("Video-LLaVA"),
    "video_llama_3": Family("VideoLLaMA3 (Qwen2 text, 1D positions)"),
    "idefics2": Family("Idefics2"),
    "got_ocr2": Family("GOT-OCR 2.0", no_template_prompt=_GOT_OCR_TURNS),
    "pp_chart2table": Family("PP-Chart2Table (transformers runs it with GOT-OCR 2.0's classes)"),
    "deepseek_vl": Family("DeepSeek-VL"),
    "deepseek_vl_hybrid": Family("DeepSeek-VL hybrid (SigLIP + SAM towers)"),
    "deepseek_ocr2": Family("DeepSeek-OCR 2 (SAM + Qwen2 query encoder; multi-head attention text)"),
    "unlimited_ocr": Family("Unlimited-OCR (SAM + CLIP encoder; DeepSeek-V2 text with reference sliding-window attention: every "
                            "prompt key, and the last sliding_window generated keys)"),
    "janus": Family("Janus (understanding path)"),
    # its visual indicator tokens after the image (<IMG_GRID>, <IMG_END>) get the vision branch's embeddings
    "ovis2": Family("Ovis2", suffix_embeds=True),
    "aria": Family("Aria (MoE text model)"),
    "muse_glimmer": Family("Muse Glimmer (gated attention, sliding-window layers)"),
    # <low_res_im_start> opens a bidirectional image block: it comes before the first image token yet reads the image
    "molmo2": Family("Molmo2 (pooled patch tokens; image tokens attend to each other bidirectionally)",
                     bidirectional_openers=("low_res_image_start_token_id", "image_start_token_id", "frame_start_token_id")),
    "muse_spark": Family("Muse Spark (image input; as Muse Glimmer with per-head output norm, MoE text model)"),
    "fuyu": Family("Fuyu (patches fed straight to the decoder)", question_only=True),
    "cohere2_vision": Family("Command A Vision (sliding window)"),
    # its processor ignores ``text`` and builds its own prompts from its chat template (one chat per image x
    # policy): the question takes the policy's place, and its template always ends with the model turn
    "shieldgemma2": Family("ShieldGemma 2", nested_images=True, own_prompt_outputs={"mm_token_type_ids": "token_type_ids"},
                           model_turn="<start_of_turn>model\n"),
    "lighton_ocr": Family("LightOnOCR"),
    # the BLIP-2 processors prepend num_query_tokens image tokens to the left-padded prompt (so a shorter prompt has
    # its padding between the image and the text)
    "blip-2": Family("BLIP-2 (Q-Former queries at image-token positions of the decoder; needs image_token_index)",
                     question_only=True, no_fast_path=_PIXELS_EVERY_CALL),
    "instructblip": Family("InstructBLIP (as BLIP-2; the Q-Former also reads the instruction)",
                           question_only=True, no_fast_path=_PIXELS_EVERY_CALL),
    "glm4v": Family("GLM-4.1V / GLM-4.5V text (3D RoPE)", own_positions=True),
    "glm46v": Family("GLM-4.6V", own_positions=True),
    "glm4v_moe": Family("GLM-4.5V (MoE)", own_positions=True),
    "glm_ocr": Family("GLM-OCR (GLM-4.1V layout)", own_positions=True),
    "glmga": Family("GLM (glmga config run by transformers' GLM-4.6V model classes)", own_positions=True),
    "qwen3_vl_moe": Family("Qwen3-VL MoE", own_positions=True),
    "ernie4_5_vl_moe": Family("ERNIE 4.5 VL (MoE)", own_positions=True),
    "paddleocr_vl": Family("PaddleOCR-VL", own_positions=True),
    "qwen2_5_omni_thinker": Family("Qwen2.5-Omni thinker (image/video input)", own_positions=True),
    "qwen3_omni_moe_thinker": Family("Qwen3-Omni thinker (image/video input)", own_positions=True),
    "qwen3_5": Family("Qwen3.5 (hybrid: gated delta-net + attention layers)", own_positions=True),
    "qwen3_5_moe": Family("Qwen3.5 MoE (hybrid)", own_positions=True),
    "lfm2_vl": Family("LFM2-VL (hybrid: short convolutions + attention layers)", nested_images=True),
    "lfm3_vl": Family("LFM3-VL (hybrid)"),
    "minicpmv4_6": Family("MiniCPM-V 4.6 (hybrid Qwen3.5 text: gated delta-net + attention layers; 1D positions)"),
    "minicpm_ocr": Family("MiniCPM-OCR (MiniCPM-V 4.6's model, 4x downsampling)"),
    "minicpmv4_7": Family("MiniCPM-V 4.7 (as 4.6, with canvas 3D RoPE computed from the token layout)", own_positions=True),
    "nemotron_h_omni": Family("Nemotron 3 Nano Omni (hybrid Nemotron-H text: Mamba-2 + attention layers without RoPE; image input)"),
    "llama4": Family("Llama 4 (MoE text model, chunked-attention and NoPE layers, QK L2 norm)",
                     compat=(llama4_image_outputs,)),
    # cross-attention families: the text reads the image only through cross-attention layers. Mllama
    # interleaves them with the decoder layers; IDEFICS keeps them in a list of their own, block i running
    # before decoder layer i x cross_layer_interval.
    "mllama": Family("Llama 3.2 Vision (cross-attention layers)", nested_images=True, no_fast_path=_CROSS_NAIVE,
                     cross=CrossLayout("layers", "cross_attn", "cross_attn_attn_gate", "<|image|>")),
    "idefics": Family("IDEFICS (v1; gated cross-attention blocks)", question_only=True, no_fast_path=_CROSS_NAIVE,
                      cross=CrossLayout("gated_cross_attn_layers", "cross_attn", "alpha_cross_attn", "<image>")),
}


def family(model_type: str, where: str = "") -> Family:
    """The record of a supported model type; a one-line refusal (``check_family``) for any other."""
    check_family(model_type, where)
    return FAMILIES[model_type]


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

# Model types that exist only from a transformers release on and are refused (supported ones say so in
# their record's ``since``): on an older release transformers cannot load them at all.
REFUSED_SINCE = {"ovis2_5": "5.25", "pi05": "5.25"}


def since(model_type: str) -> str | None:
    """The transformers release that added ``model_type``, where headsteer's range also holds older ones."""
    f = FAMILIES.get(model_type)
    return f.since if f is not None else REFUSED_SINCE.get(model_type)


def supported_families() -> str:
    return ", ".join(sorted(FAMILIES))


def check_family(model_type: str, where: str = ""):
    """One-line HeadsteerError for a model type headsteer does not support, saying why."""
    if model_type in FAMILIES:
        return
    why = REFUSED.get(model_type, "no tested adapter for it yet")
    raise HeadsteerError(f"unsupported architecture {model_type!r}{where}: {why}; supported: {supported_families()}")


def families_markdown() -> str:
    """docs/families.md: every record's facts, and every refusal (tests/test_families.py keeps it current)."""
    defaults = Family("")
    out = ["# Model families", "",
           "Generated from `headsteer/families.py` by `python -m headsteer.families > docs/families.md`; do not edit by hand.",
           "A fact not listed is the generic behaviour (the LLaVA layout: image tokens in a causal decoder, positions from 0,",
           "the processor's chat template, the fast attribution path).", "",
           f"## Supported ({len(FAMILIES)})", "", "| model type | family | facts |", "|---|---|---|"]
    for name in sorted(FAMILIES):
        f = FAMILIES[name]
        facts = []
        for fd in fields(Family):
            v = getattr(f, fd.name)
            if fd.name == "notes" or v == getattr(defaults, fd.name):
                continue
            if fd.name == "compat":
                v = ", ".join(fn.__name__ for fn in v)
            facts.append(f"{fd.name}: {v}" if v is not True else fd.name)
        cell = "; ".join(facts).replace("|", "\\|").replace("\n", "\\n")
        out.append(f"| `{name}` | {f.notes} | {cell} |")
    out += ["", f"## Refused ({len(REFUSED)})", "", "| model type | why |", "|---|---|"]
    out += [f"| `{name}` | {REFUSED[name]} |" for name in sorted(REFUSED)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(families_markdown(), end="")
