"""Real processors of the LLaVA-style families on their tiny models: LLaVA-OneVision, Granite 4
Vision, VipLLaVA, LLaVA-NeXT-Video, Video-LLaVA, Aya Vision, InternVL, Qianfan-OCR, Mistral 3,
LightOnOCR, Cohere2 Vision (each a ``ProcessorSpec``; see tests/tiny_processors.py)."""
import importlib
import sys
import types
from functools import partial

import torch
import transformers as tf
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.pixtral import image_processing_pil_pixtral
from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

from processors_core import LLAVA_TEMPLATE
from tiny_models import CLIP, IMG, SIGLIP, TEXT
from tiny_processors import ProcessorSpec, feature_counts, make_tokenizer, template, unchecked_video

PINPOINTS = [[32, 32], [32, 64], [64, 32]]  # anyres: a wide image gets two 32x32 tiles besides the base view
VIDEO = 89  # the video token id of the tiny video models (tests/tiny_models.py)
CHATML = template("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<image>\n")  # Qwen2 turns


def _llava_onevision_model():
    cfg = tf.LlavaOnevisionConfig(vision_config=tf.SiglipVisionConfig(**SIGLIP), text_config=tf.Qwen2Config(**TEXT),
                                  image_token_index=IMG, video_token_index=VIDEO, image_grid_pinpoints=PINPOINTS,
                                  vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    torch.manual_seed(0)
    return tf.LlavaOnevisionForConditionalGeneration(cfg).eval()


def _llava_onevision():
    # SigLIP has no CLS token ("full"): 16 base tokens + the unpadded anyres grid with a newline per row;
    # several images in one prompt get the base view only (16 + one newline each)
    ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    tok = make_tokenizer({"image_token": "<image>", "video_token": "<video>"}, ("<|im_start|>", "<|im_end|>"),
                         ids={"<image>": IMG, "<video>": VIDEO})
    return unchecked_video(tf.LlavaOnevisionProcessor, ip, tok, video_processor=None, num_image_tokens=16,
                                                                vision_feature_select_strategy="full", chat_template=CHATML)


def _granite4_vision_model():
    """tests/tiny_models.py's Granite 4 Vision with three anyres pinpoints (a wide image gets two tiles)."""
    text = dict(TEXT, embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0, attention_multiplier=0.125)
    qformer = dict(num_hidden_layers=1, intermediate_size=64, cross_attention_frequency=1, max_position_embeddings=64,
                   use_qformer_text_input=False)
    cfg = tf.Granite4VisionConfig(text_config=text, vision_config=dict(CLIP, hidden_size=64, num_hidden_layers=2), qformer_config=qformer,
                                  image_token_index=IMG, image_grid_pinpoints=PINPOINTS, downsample_rate="1/2",
                                  deepstack_layer_map=[[0, 0], [1, 1]], spatial_target_layers=[0, 1, 0, 1], vision_feature_layer=-1,
                                  projector_dropout=0.0)
    torch.manual_seed(0)
    return tf.Granite4VisionForConditionalGeneration(cfg).eval()


def _granite4_vision():
    # LLaVA-NeXT's image processor; the Q-Former halves each side: 2x2 base tokens + the unpadded tile grid with newlines
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    tok = make_tokenizer({"image_token": "<image>"}, ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"))
    return tf.Granite4VisionProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                      downsample_rate="1/2",
                                      chat_template=template("<|start_of_role|>user<|end_of_role|>", "<|end_of_text|>\n",
                                                             "<|start_of_role|>assistant<|end_of_role|>", "<image>\n"))


def _granite4_vision_features(model, inputs):
    """Image tokens per image: get_image_features returns per-layer DeepStack features, each a list per image."""
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    return [len(x) for x in out.deepstack_features[0][1]]


def _vipllava():
    # LlavaProcessor (the checkpoints name it) with a CLIP image processor; the turns of the checkpoints'
    # prompt "###Human: <image>\n{question}###Assistant:" (its system sentence left out: words the tiny tokenizer lacks)
    tok = make_tokenizer({"image_token": "<image>"}, ("###", "Human"))
    return tf.LlavaProcessor(CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tok,
                             patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                             chat_template=template("###Human: ", "", "###Assistant:", "<image>\n"))


def _llava_next_video_model():
    cfg = tf.LlavaNextVideoConfig(vision_config=tf.CLIPVisionConfig(**CLIP), text_config=tf.LlamaConfig(**TEXT), image_token_index=IMG,
                                  video_token_index=VIDEO, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1, image_seq_length=16)
    torch.manual_seed(0)
    return tf.LlavaNextVideoForConditionalGeneration(cfg).eval()


def _llava_next_video():
    # images as LLaVA-NeXT (anyres tiles, CLS dropped); the checkpoints' Vicuna turns (USER: ... ASSISTANT:)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    tok = make_tokenizer({"image_token": "<image>", "video_token": "<video>"}, ids={"<image>": IMG, "<video>": VIDEO})
    return unchecked_video(tf.LlavaNextVideoProcessor, None, ip, tok, chat_template=LLAVA_TEMPLATE, patch_size=8,
                                                               vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _video_llava():
    # its own image processor (numpy, no torchvision) gives pixel_values_images; Vicuna turns as the checkpoints'
    ip = VideoLlavaImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tok = make_tokenizer({"image_token": "<image>", "video_token": "<video>"}, ids={"<image>": IMG, "<video>": VIDEO})
    return unchecked_video(tf.VideoLlavaProcessor, ip, None, tok, patch_size=8, vision_feature_select_strategy="default",
                                                           num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)


AYA_TILES = ("TILE_GLOBAL", *(f"TILE_{i}" for i in range(1, 5)))


def _aya_vision():
    # GOT-OCR2's image processor crops a wide image into 32x32 tiles plus a global view; the processor
    # writes <|START_OF_IMG|> TILE_1 <|IMG_PATCH|> x 4 ... TILE_GLOBAL <|IMG_PATCH|> x 4 <|END_OF_IMG|>
    # (the model's image token is <|IMG_PATCH|>, not the processor's <image>); Cohere turns
    tok = make_tokenizer(specials=("<|IMG_PATCH|>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_LINE_BREAK|>", "<image>", *AYA_TILES,
                                   "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"),
                         ids={"<|IMG_PATCH|>": IMG})
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4)
    return tf.AyaVisionProcessor(ip, tok, patch_size=8, img_size=32, downsample_factor=2,
                                 chat_template=template("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                                                        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", "<image>"))


def tile_feature_counts(model, inputs, one_tile_per_run=False) -> list[int]:
    """Image features per prompt where get_image_features returns one row per tile of all images together
    and the processor drops its tiles-per-image count (num_patches), so the model's output cannot be split
    per image: it must give exactly as many features as the prompts hold image tokens, every run of image
    tokens must hold whole tiles of the model's size (exactly one where tile markers sit between tiles),
    and then each prompt's image tokens are its tiles' features."""
    per_tile = feature_counts(model, inputs)
    n = per_tile[0]
    img = inputs["input_ids"] == IMG
    assert sum(per_tile) == int(img.sum()), "the model's features are not the prompts' image tokens"
    for row in img:
        edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.long), row.long(), torch.zeros(1, dtype=torch.long)])).nonzero()
        runs = (edges[1::2] - edges[::2]).flatten().tolist()
        assert all(r == n if one_tile_per_run else r % n == 0 for r in runs), f"image-token runs {runs} are not tiles of {n}"
    return img.sum(1).tolist()


def _internvl():
    # GOT-OCR2's image processor crops a wide image into 32x32 tiles plus a global view; the processor
    # writes <img> <IMG_CONTEXT> x 4 per tile (tiles contiguous) </img>; the chat template's image is
    # <IMG_CONTEXT> itself; ChatML turns
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    tok = make_tokenizer(named, ("<|im_start|>", "<|im_end|>"), ids={"<IMG_CONTEXT>": IMG})
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4)
    chat = template("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<IMG_CONTEXT>\n")
    return unchecked_video(tf.InternVLProcessor, ip, tok, None, image_seq_length=4, chat_template=chat)


def _qianfan_ocr():
    # InternVL's layout (<img> <IMG_CONTEXT> x 4 per tile </img>) from a chat template that writes <image>; no video
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
    tok = make_tokenizer(named, ("<|im_start|>", "<|im_end|>", "<image>"), ids={"<IMG_CONTEXT>": IMG})
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4)
    return tf.QianfanOCRProcessor(ip, tok, image_seq_length=4, chat_template=CHATML)


def pixtral_processor_class():
    """transformers' real PixtralProcessor (Mistral 3's, LightOnOCR's image layout).

    processing_pixtral imports one helper (get_resize_output_image_size) from the torchvision image
    processor module at import time, which fails here; the Pil module defines the same function, so
    it stands in for that module while processing_pixtral is first imported (and only then)."""
    name = "transformers.models.pixtral.image_processing_pixtral"
    shim = types.ModuleType(name)
    shim.get_resize_output_image_size = image_processing_pil_pixtral.get_resize_output_image_size
    saved = sys.modules.get(name)
    sys.modules[name] = shim
    try:
        return importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor
    finally:
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved


def _mistral3():
    # Pixtral's layout: a row of [IMG] per 2x2 merged patches, [IMG_BREAK] after each row, [IMG_END] last;
    # the image keeps its aspect ratio (a wide image: one row of two). Mistral's turns have no generation
    # prompt: the prompt ends with [/INST]
    ip = image_processing_pil_pixtral.PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size={"height": 8, "width": 8})
    tok = make_tokenizer(specials=("[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"), ids={"[IMG]": IMG})
    return pixtral_processor_class()(ip, tok, patch_size=8, spatial_merge_size=2, chat_template=template("[INST]", "[/INST]", "", "[IMG]"))


def _lighton_ocr():
    # Pixtral's image processor (sizes a multiple of the merged 16-pixel patch) but a plain run of
    # <|image_pad|> (no row breaks); Qwen3's ChatML turns
    named = {"image_token": "<|image_pad|>", "image_break_token": "<|vision_pad|>", "image_end_token": "<|vision_end|>"}
    tok = make_tokenizer(named, ("<|im_start|>", "<|im_end|>"), ids={"<|image_pad|>": IMG})
    ip = image_processing_pil_pixtral.PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size={"height": 16, "width": 16})
    return tf.LightOnOcrProcessor(ip, tok, patch_size=8, spatial_merge_size=2,
                                  chat_template=template("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n",
                                                         "<|image_pad|>"))


class Cohere2VisionTileProcessor(GotOcr2ImageProcessorPil):
    """Stand-in for Cohere2VisionImageProcessor, which is torchvision-only. That class is GOT-OCR2's image
    processor (crop into tiles of ``size`` plus a thumbnail when there are several; ``num_patches`` per
    image) with ``patch_size``, the image tokens per tile side that Cohere2VisionProcessor reads, and its
    own choice of tile grid (least upscaling); for the 3:1 and 1:1 images of these tests both choices
    give the same grid (3x1 tiles + thumbnail, one tile)."""

    patch_size = 2  # 32-pixel tile: 4x4 SigLIP patches, downsampled 2x -> 2x2 image tokens


def _cohere2_vision():
    # <|START_OF_IMG|> (<|IMG_PATCH|> x 4 <|IMG_LINE_BREAK|>) per tile <|END_OF_IMG|>; Cohere turns
    named = {"boi_token": "<|START_OF_IMG|>", "eoi_token": "<|END_OF_IMG|>", "image_token": "<|IMG_PATCH|>",
             "img_line_break_token": "<|IMG_LINE_BREAK|>"}
    tok = make_tokenizer(named, ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"),
                         ids={"<|IMG_PATCH|>": IMG})
    ip = Cohere2VisionTileProcessor(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4)
    return tf.Cohere2VisionProcessor(ip, tok, chat_template=template("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                                                                     "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", "<|IMG_PATCH|>"))


SPECS: dict[str, ProcessorSpec] = {
    "llava_onevision": ProcessorSpec(_llava_onevision, (["<|im_start|>"], "assistant"), multi_image=True, tiles=True,
                                     model=_llava_onevision_model),
    "granite4_vision": ProcessorSpec(_granite4_vision, (["<|start_of_role|>", "assistant"], "<|end_of_role|>"), multi_image=True,
                                     tiles=True, model=_granite4_vision_model, feature_counts=_granite4_vision_features),
    "vipllava": ProcessorSpec(_vipllava, (["###", "Assistant"], ":"), multi_image=True),
    "llava_next_video": ProcessorSpec(_llava_next_video, (["ASSISTANT"], ":"), multi_image=True, tiles=True, model=_llava_next_video_model),
    "video_llava": ProcessorSpec(_video_llava, (["ASSISTANT"], ":"), multi_image=True),
    "aya_vision": ProcessorSpec(_aya_vision, (["<|START_OF_TURN_TOKEN|>"], "<|CHATBOT_TOKEN|>"),
                                ["<|START_OF_IMG|>", "TILE_1", "TILE_GLOBAL", "<|END_OF_IMG|>"], multi_image=True, tiles=True,
                                feature_counts=partial(tile_feature_counts, one_tile_per_run=True)),
    "internvl": ProcessorSpec(_internvl, (["<|im_start|>"], "assistant"), ["<img>", "</img>"], multi_image=True, tiles=True,
                              feature_counts=tile_feature_counts),
    "qianfan_ocr": ProcessorSpec(_qianfan_ocr, (["<|im_start|>"], "assistant"), ["<img>", "</img>"], multi_image=True, tiles=True,
                                 feature_counts=tile_feature_counts),
    # a square image gets two rows ([IMG_BREAK] between: text inside the image), a wide one a single row,
    # which the fast path takes
    "mistral3": ProcessorSpec(_mistral3, ([], "[/INST]"), ["[IMG_BREAK]", "[IMG_END]"], multi_image=True, tiles=True,
                              sizes=((32, 32), (96, 32))),
    "lighton_ocr": ProcessorSpec(_lighton_ocr, (["<|im_start|>"], "assistant"), multi_image=True, tiles=True),
    "cohere2_vision": ProcessorSpec(_cohere2_vision, (["<|START_OF_TURN_TOKEN|>"], "<|CHATBOT_TOKEN|>"),
                                    ["<|START_OF_IMG|>", "<|IMG_LINE_BREAK|>", "<|END_OF_IMG|>"], multi_image=True, tiles=True,
                                    feature_counts=partial(tile_feature_counts, one_tile_per_run=True)),
}
