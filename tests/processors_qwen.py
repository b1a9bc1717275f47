"""Real processors of the 3D-RoPE (multimodal RoPE) families on their tiny models: Qwen2-VL, Qwen2.5-VL,
Qwen3-VL (dense and MoE), LLaVA-OneVision-1.5 (1D positions), Cosmos3 Edge, Cohere Compass, the Qwen2.5-Omni / Qwen3-Omni thinkers, and
the hybrid stacks Qwen3.5 (dense, MoE), LFM3-VL and LFM2-VL.

Their processors expand ``<|image_pad|>`` into one token per 2x2-merged patch between
``<|vision_start|>`` and ``<|vision_end|>``; the image processor (Qwen2VLImageProcessorPil, patch 4,
merge 2, as the tiny vision towers) resizes an image to a multiple of 8 pixels, so a 48x16 image gets
a 4x12 patch grid (12 tokens) and a 16x16 one 4x4 (4 tokens), and the model lays its 3D positions out from
that grid (image_grid_thw) and the token layout."""
import math

import numpy as np
import torch
import transformers as tf
from PIL import Image
from tiny_processors import ProcessorSpec, make_tokenizer, template, unchecked_video
from transformers.models.cohere_compass.image_processing_pil_cohere_compass import CohereCompassImageProcessorPil
from transformers.models.cosmos3_edge.image_processing_pil_cosmos3_edge import Cosmos3EdgeImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.processing_utils import ImagesKwargs

# the ids the tiny 3D-RoPE models' configs name (tests/tiny_models.py: _qwen_vl, _mrope)
QWEN_IDS = {"<|image_pad|>": 90, "<|vision_start|>": 88, "<|vision_end|>": 89, "<|video_pad|>": 87}
QWEN_AROUND = ["<|vision_start|>", "<|vision_end|>"]
QWEN_ROLE = (["<|im_start|>"], "assistant")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# ChatML as in the Qwen-VL checkpoints (their default system turn left out: it only adds text before the image)
CHATML = template("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", QWEN_IMAGE)


def qwen_tokenizer(*specials, named=None):
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", **(named or {})}
    return make_tokenizer(named, ("<|im_start|>", "<|im_end|>", *QWEN_AROUND, *specials), ids=QWEN_IDS)


def qwen_image_processor(**kw):
    # min/max pixels sized for the tiny tower (16x16 .. 32x32-worth), resized to multiples of 8
    return Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2,
                                    size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32}, **kw)


SIZES = ((48, 16), (16, 16))  # a wide image (12 tokens) and a square one (4 tokens)


def _qwen(cls, gen="<|im_start|>assistant\n", specials=()):
    return lambda: unchecked_video(cls, qwen_image_processor(), qwen_tokenizer(*specials), video_processor=None,
                                           chat_template=template("<|im_start|>user\n", "<|im_end|>\n", gen, QWEN_IMAGE))


def _cosmos3_edge():
    # SigLIP2-style patches: no temporal patch (3 * 4 * 4 values per patch), 2x2 merge
    ip = Cosmos3EdgeImageProcessorPil(patch_size=4, temporal_patch_size=1, merge_size=2,
                                      size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
    return unchecked_video(tf.Cosmos3EdgeProcessor, ip, qwen_tokenizer(), video_processor=None, chat_template=CHATML)


def _llava_onevision1_5():
    # transformers maps only an image processor (Qwen2-VL's) to llava_onevision1_5; its RICE ViT takes
    # patches without a temporal dimension (3 * 4 * 4 values), merged 2x2; Qwen2-VL's processor lays the
    # prompt out (an assumption about the checkpoints' processor_config, not read from one)
    ip = Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=1, merge_size=2,
                                  size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
    return unchecked_video(tf.Qwen2VLProcessor, ip, qwen_tokenizer(), video_processor=None, chat_template=CHATML)


COMPASS_AROUND = ["<|VISION_START|>", "<|VISION_END|>"]
COMPASS_ROLE = (["<|START_OF_TURN_TOKEN|>"], "<|CHATBOT_TOKEN|>")


def _cohere_compass():
    # the processor hard-codes upper-case Qwen-style vision tokens; Cohere turn markup around them
    ids = {"<|IMAGE_PAD|>": 90, "<|VISION_START|>": 88, "<|VISION_END|>": 89, "<|VIDEO_PAD|>": 87}
    turns = ("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>")
    tok = make_tokenizer({"image_token": "<|IMAGE_PAD|>", "video_token": "<|VIDEO_PAD|>"}, (*turns, *COMPASS_AROUND), ids=ids)
    ip = CohereCompassImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2,
                                        size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
    chat = template("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
                    "<|VISION_START|><|IMAGE_PAD|><|VISION_END|>")
    return unchecked_video(tf.CohereCompassProcessor, ip, tok, video_processor=None, chat_template=chat)


OMNI_AROUND = ["<|vision_bos|>", "<|vision_eos|>"]


def _omni(cls):
    """The Omni processors hold an audio feature extractor too (Whisper's, 8 mel bins as the tiny audio
    tower); their tokenizer names the image/audio/video tokens and the vision/audio bos/eos markers."""
    def build():
        named = {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
                 "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                 "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
        tok = make_tokenizer(named, ("<|im_start|>", "<|im_end|>"),
                             ids={"<|IMAGE|>": 90, "<|vision_bos|>": 88, "<|vision_eos|>": 89, "<|VIDEO|>": 87})
        chat = template("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<|vision_bos|><|IMAGE|><|vision_eos|>")
        return unchecked_video(cls, qwen_image_processor(), video_processor=None, feature_extractor=tf.WhisperFeatureExtractor(feature_size=8),
                                       tokenizer=tok, chat_template=chat)
    return ProcessorSpec(build, QWEN_ROLE, OMNI_AROUND, multi_image=True, tiles=True, sizes=SIZES)


class _Lfm2VlImagesKwargs(ImagesKwargs, total=False):
    """What Lfm2VlProcessor asks its image processor for, and (transformers >= 5.25) the layout settings it
    reads from the image processor's merged kwargs (the real class's Lfm2VlImageProcessorKwargs)."""

    return_row_col_info: bool
    downsample_factor: int
    do_image_splitting: bool
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    min_image_tokens: int
    max_image_tokens: int
    encoder_patch_size: int
    tile_size: int
    max_pixels_tolerance: float


class OneTileLfm2VlImageProcessor(SiglipImageProcessorPil):
    """Lfm2VlImageProcessor needs torchvision, which headsteer does not depend on. This stand-in gives
    its output for images small enough to stay one tile (no splitting, no thumbnail): each image resized
    as its ``smart_resize`` does (sides multiples of encoder_patch_size * downsample_factor, pixels
    between min_image_tokens and max_image_tokens worth), cut into flattened patches padded to
    max_image_tokens * downsample_factor**2, with pixel_attention_mask, spatial_shapes and the
    row/column/size info Lfm2VlProcessor lays the prompt out from."""

    downsample_factor, encoder_patch_size, min_image_tokens, max_image_tokens = 2, 8, 4, 16
    tile_size, use_thumbnail = 64, True
    valid_kwargs = _Lfm2VlImagesKwargs

    def __call__(self, images, **kwargs):
        flat = [im for group in images for im in (group if isinstance(group, (list, tuple)) else [group])]
        ps, f = self.encoder_patch_size, self.encoder_patch_size * self.downsample_factor
        lo, hi = (n * ps**2 * self.downsample_factor**2 for n in (self.min_image_tokens, self.max_image_tokens))
        pad = self.max_image_tokens * self.downsample_factor**2
        pixels, masks, shapes, sizes = [], [], [], []
        for im in flat:
            w, h = im.size
            hb, wb = max(f, round(h / f) * f), max(f, round(w / f) * f)
            if hb * wb > hi or hb * wb < lo:
                beta = math.sqrt(h * w / (hi if hb * wb > hi else lo))
                rnd = math.floor if hb * wb > hi else math.ceil
                hb, wb = max(f, rnd(h / beta / f) * f), max(f, rnd(w / beta / f) * f)
            x = np.asarray(im.convert("RGB").resize((wb, hb), Image.BILINEAR), dtype=np.float32) / 255
            x = torch.from_numpy((x - 0.5) / 0.5)  # IMAGENET_STANDARD mean/std
            nh, nw = hb // ps, wb // ps
            x = x.reshape(nh, ps, nw, ps, 3).permute(0, 2, 1, 3, 4).reshape(nh * nw, ps * ps * 3)
            pixels.append(torch.cat([x, x.new_zeros(pad - len(x), x.shape[1])]))
            masks.append(torch.arange(pad) < len(x))
            shapes.append([nh, nw])
            sizes.append([hb, wb])
        return tf.BatchFeature({"pixel_values": torch.stack(pixels), "pixel_attention_mask": torch.stack(masks),
                                "spatial_shapes": torch.tensor(shapes), "image_rows": [1] * len(flat),
                                "image_cols": [1] * len(flat), "image_sizes": sizes})


def _lfm2_vl():
    tok = make_tokenizer({"image_token": "<image>"}, ("<|im_start|>", "<|im_end|>", "<|image_start|>", "<|image_end|>",
                                                        "<|img_thumbnail|>"))
    return tf.Lfm2VlProcessor(OneTileLfm2VlImageProcessor(), tok, chat_template=template(
        "<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<image>"))


QWEN_THINK = {"gen": "<|im_start|>assistant\n<think>\n", "specials": ("<think>", "</think>")}
QWEN_THINK_ROLE = (["<|im_start|>", "assistant"], "<think>")


def _spec(cls, role=QWEN_ROLE, **kw):
    return ProcessorSpec(_qwen(cls, **kw), role, QWEN_AROUND, multi_image=True, tiles=True, sizes=SIZES)


SPECS = {
    "qwen2_vl": _spec(tf.Qwen2VLProcessor),
    "qwen2_5_vl": _spec(tf.Qwen2_5_VLProcessor),
    "qwen3_vl": _spec(tf.Qwen3VLProcessor),
    "qwen3_vl_moe": _spec(tf.Qwen3VLProcessor),  # transformers maps qwen3_vl_moe to Qwen3VLProcessor
    # transformers maps no processor to cosmos3_omni; its reasoner is Qwen3-VL's architecture, whose processor
    # lays out its tokens (an assumption about the checkpoints' processor_config, not read from one)
    "cosmos3_omni": _spec(tf.Qwen3VLProcessor),
    # Cosmos3 Edge: its processor returns mm_token_type_ids (which the model's 3D RoPE requires) only when
    # asked (Adapter.processor_kwargs)
    "llava_onevision1_5": ProcessorSpec(_llava_onevision1_5, QWEN_ROLE, QWEN_AROUND, multi_image=True, tiles=True, sizes=SIZES),
    "cosmos3_edge": ProcessorSpec(_cosmos3_edge, QWEN_ROLE, QWEN_AROUND, multi_image=True, tiles=True, sizes=SIZES),
    "qwen2_5_omni_thinker": _omni(tf.Qwen2_5OmniProcessor),
    "qwen3_omni_moe_thinker": _omni(tf.Qwen3OmniMoeProcessor),
    "cohere_compass": ProcessorSpec(_cohere_compass, COMPASS_ROLE, COMPASS_AROUND, multi_image=True, tiles=True, sizes=SIZES),
    # hybrid stacks (some decoder layers recurrent/convolutional). Qwen3.5 also takes Qwen3VLProcessor; its template opens the thinking block in the generation
    # prompt by default, so the prompt ends "...<|im_start|>assistant\n<think>\n"
    "qwen3_5": _spec(tf.Qwen3VLProcessor, QWEN_THINK_ROLE, **QWEN_THINK),
    "qwen3_5_moe": _spec(tf.Qwen3VLProcessor, QWEN_THINK_ROLE, **QWEN_THINK),
    # LFM3-VL (conv + attention layers): Qwen-style vision tokens and ChatML, 1D text positions
    "lfm3_vl": _spec(tf.Lfm3VlProcessor),
    # LFM2-VL (conv + attention layers): <|image_start|> image tokens <|image_end|>; one tile per image
    # here (OneTileLfm2VlImageProcessor); a 32x64 image gets 8 tokens, a 32x32 one 4
    "lfm2_vl": ProcessorSpec(_lfm2_vl, QWEN_ROLE, ["<|image_start|>", "<|image_end|>"], multi_image=True, tiles=True,
                             sizes=((64, 32), (32, 32))),
}
