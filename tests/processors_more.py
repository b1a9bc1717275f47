"""Real processors of the last families on their tiny models: Nemotron 3 Nano Omni (hybrid Mamba-2 +
attention text; patches of an aspect-preserving resize, pixel-shuffled 2x2) and Unlimited-OCR (SAM +
CLIP global view, and local tiles), whose image processors need torchvision, with documented stand-ins;
and DeepSeek-OCR 2, whose prompt is the bare "<image>\n{question}" (no chat turns, so it ends on the
question's last word: ``question_ends_prompt``), with a tiny model whose SAM tower takes the processor's
768-pixel global view."""
import math

import numpy as np
import torch
import transformers as tf
from torch.nn import functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, make_flat_list_of_images
# get_optimal_tiled_canvas: the same code as unlimited_ocr's torchvision module holds, from a module that imports without it
from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil, get_optimal_tiled_canvas

from tiny_models import IMG, SAM, TEXT
from tiny_processors import ProcessorSpec, make_tokenizer, template, unchecked_video

QWEN_TURNS = ("<|im_start|>", "<|im_end|>")


def _nemotron_grid(height, width, patch, merge, min_patches, max_patches):
    """The real get_patch_grid_size: the (rows, cols) patch grid an image is resized to."""
    gh, gw = round(height / patch + 0.5), round(width / patch + 0.5)
    factor = min(math.sqrt(max_patches / (gh * gw)), 1.0)
    gh, gw = math.floor(factor * gh), math.floor(factor * gw)
    if max_patches > min_patches and gh * gw < min_patches:
        factor = math.sqrt(min_patches / (gh * gw))
        gh, gw = math.ceil(factor * gh), math.ceil(factor * gw)
    if r := gh % merge:
        gh = gh + merge - r if (gh + merge - r) * gw <= max_patches else max(merge, gh - r)
    if r := gw % merge:
        gw = gw + merge - r if gh * (gw + merge - r) <= max_patches else max(merge, gw - r)
    return gh, gw


class NemotronOmniPilImageProcessor(PilBackend):
    """NemotronH_Omni_Reasoning_V3ImageProcessor needs torchvision, which headsteer does not depend on.
    This stand-in follows the real class's code (transformers/models/nemotron_h_omni/
    image_processing_nemotron_h_omni.py): every image of a call gets the patch budget
    clamp((max_model_len - 4) * merge**2, [min_num_patches, max_num_patches]); get_patch_grid_size picks
    its grid (both sides multiples of merge = 1 / downsample_ratio); the image is resized to that grid
    in float32 (bicubic with antialiasing, as torchvision resizes a float tensor; skipped when it already
    fits), rescaled, normalized with OpenAI CLIP mean/std and cut into row-major patches laid out
    (channel, y, x): pixel_values float [patches of every image, 3*patch*patch], image_grid_hw long
    [images, 2]. The checkpoints' 16-pixel patches and min_num_patches 1024 become 4 and 4, for the tiny
    RADIO tower (the test images then keep their size: (96, 32) -> 8x24 patches, (32, 32) -> 8x8).
    Left out: per-shape grouping (each image is processed alone, same result)."""

    model_input_names = ["pixel_values", "image_grid_hw"]

    def __init__(self, patch_size=4, downsample_ratio=0.5, min_num_patches=4, max_num_patches=13312, max_model_len=16384, **kwargs):
        super().__init__(**kwargs)
        self.patch_size, self.downsample_ratio = patch_size, downsample_ratio
        self.min_num_patches, self.max_num_patches, self.max_model_len = min_num_patches, max_num_patches, max_model_len

    def __call__(self, images, return_tensors=None, **kwargs):
        images, p = make_flat_list_of_images(images), self.patch_size
        merge = round(1 / self.downsample_ratio)
        budget = max((self.max_model_len - 4) * merge ** 2, self.min_num_patches * len(images))
        if self.max_num_patches:
            budget = min(budget, self.max_num_patches)
        budget = max(budget, self.min_num_patches)
        mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
        pixels, grids = [], []
        for im in images:
            x = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float()
            gh, gw = _nemotron_grid(x.shape[1], x.shape[2], p, merge, self.min_num_patches, budget)
            if x.shape[1:] != (gh * p, gw * p):
                x = F.interpolate(x[None], size=(gh * p, gw * p), mode="bicubic", align_corners=False, antialias=True)[0]
            x = (x / 255 - mean) / std
            pixels.append(x.reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3 * p * p))
            grids.append([gh, gw])
        return BatchFeature({"pixel_values": torch.cat(pixels), "image_grid_hw": torch.tensor(grids)}, tensor_type=return_tensors)


def _nemotron_h_omni():
    # <image> becomes <img> <image> x (patches / 4) </img>; the turns are ChatML's (<|im_start|>/<|im_end|>,
    # as Nemotron-H's tokenizer); the processor also holds the real Parakeet audio feature extractor (never
    # called here) and takes video (None)
    tok = make_tokenizer({"image_token": "<image>", "image_start_token": "<img>", "image_end_token": "</img>"}, QWEN_TURNS)
    return unchecked_video(tf.NemotronH_Omni_Reasoning_V3Processor, NemotronOmniPilImageProcessor(), None, tok,
                           tf.ParakeetFeatureExtractor(),
                           chat_template=template("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<image>\n"))


def _resize_bytes(x, height, width):
    """uint8-valued float [C, H, W] resized bicubic with antialiasing and rounded back to bytes, as
    torchvision resizes a uint8 tensor."""
    return F.interpolate(x[None], size=(height, width), mode="bicubic", align_corners=False, antialias=True)[0].round().clamp(0, 255)


class UnlimitedOcrPilImageProcessor(PilBackend):
    """UnlimitedOcrImageProcessor needs torchvision, which headsteer does not depend on. This stand-in
    follows the real class's code (transformers/models/unlimited_ocr/image_processing_unlimited_ocr.py,
    crop_to_patches=True): an image whose longer side exceeds tile_size is resized to the canvas of
    tiles the real get_optimal_tiled_canvas picks (DeepSeek-OCR 2's Pil module holds the same code) and cut into
    tile_size squares in raster order; every image also gets a global view, resized so its longer side
    is max(size) (aspect kept) and padded to a square with (127, 127, 127), centred. Resizing is
    bicubic with antialiasing, rounded back to bytes (torchvision on a uint8 tensor); then rescale and
    normalize (mean = std = 0.5). Outputs: pixel_values float [images, 3, S, S], pixel_values_local
    float [tiles of every image, 3, T, T] (only when some image is tiled), num_local_patches and
    patches_grid ((columns, rows); (1, 1) untiled) as lists. The checkpoints' 1024-pixel global view and
    640-pixel tiles become 128 and 128, for the tiny SAM tower (2x2 queries per view)."""

    model_input_names = ["pixel_values", "num_local_patches", "patches_grid"]

    def __init__(self, size=None, tile_size=128, min_patches=2, max_patches=32, background_color=(127, 127, 127), **kwargs):
        super().__init__(**kwargs)
        self.size = size or {"height": 128, "width": 128}
        self.tile_size, self.min_patches, self.max_patches = tile_size, min_patches, max_patches
        self.background_color = list(background_color)

    def __call__(self, images, return_tensors=None, **kwargs):
        t, side = self.tile_size, max(self.size["height"], self.size["width"])
        norm = lambda x: (x / 255 - 0.5) / 0.5
        views, local, counts, grids = [], [], [], []
        for im in make_flat_list_of_images(images):
            x = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float()
            h, w = x.shape[1:]
            if max(h, w) > t:
                cols, rows = get_optimal_tiled_canvas((h, w), (t, t), self.min_patches, self.max_patches)
                canvas = norm(_resize_bytes(x, rows * t, cols * t))
                local += [canvas[:, r * t : (r + 1) * t, c * t : (c + 1) * t] for r in range(rows) for c in range(cols)]
                counts.append(rows * cols)
            else:
                cols, rows = 1, 1
                counts.append(0)
            grids.append([cols, rows])
            scale = side / max(h, w)
            nh, nw = round(h * scale), round(w * scale)
            g = torch.tensor(self.background_color, dtype=torch.float32)[:, None, None].expand(3, side, side).clone()
            top, left = (side - nh) // 2, (side - nw) // 2
            g[:, top : top + nh, left : left + nw] = _resize_bytes(x, nh, nw)
            views.append(norm(g))
        data = {"pixel_values": torch.stack(views)}
        if local:
            data["pixel_values_local"] = torch.stack(local)
        data["num_local_patches"], data["patches_grid"] = counts, grids
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=["num_local_patches", "patches_grid"])


def _unlimited_ocr():
    # <image> becomes 7 <image> per global view (2x2 queries + a newline per row + a view separator) and,
    # for a tiled image, (rows * 2) x (columns * 2 + 1) more; the processor's defaults (16-pixel SAM
    # patches, downsample 4) are the real ones. A cut-down template (the checkpoint's is not available
    # offline): DeepSeek's <|User|> / <|Assistant|> turns, the image before the question
    tok = make_tokenizer({"image_token": "<image>"}, ("<|User|>", "<|Assistant|>"))
    return tf.UnlimitedOcrProcessor(UnlimitedOcrPilImageProcessor(), tok,
                                    chat_template=template("<|User|>: ", "\n\n", "<|Assistant|>:", "<image>\n"))


def _deepseek_ocr2_model():
    """DeepSeek-OCR 2 as tests/tiny_models.py builds it, with a SAM tower at the 768-pixel global view:
    its query encoder always emits 144 queries when SAM yields at most 12x12 features (256 above), and
    the processor counts ceil(768 / 16 / 4)^2 = 144 (+ a view separator). 64-pixel SAM patches (12x12,
    then 3x3 after the necks) keep it fast; 48x48 16-pixel patches give the same count."""
    text = {k: v for k, v in TEXT.items() if k != "head_dim"}
    vision = dict(sam_config=dict(SAM, image_size=768, patch_size=64, downsample_channels=[16, 32]),
                  encoder_config=dict(TEXT, vocab_size=8))
    cfg = tf.DeepseekOcr2Config(text_config=dict(text, mlp_layer_types=["dense", "dense"]), vision_config=vision, image_token_id=IMG)
    torch.manual_seed(0)
    return tf.DeepseekOcr2ForConditionalGeneration(cfg).eval()


def _deepseek_ocr2():
    # the real Pil image processor at a 768-pixel global view (test images up to 768 pixels get no local tiles)
    ip = DeepseekOcr2ImageProcessorPil(size={"height": 768, "width": 768}, tile_size=768)
    return tf.DeepseekOcr2Processor(ip, make_tokenizer({"image_token": "<image>"}))


SPECS: dict[str, ProcessorSpec] = {
    "nemotron_h_omni": ProcessorSpec(_nemotron_h_omni, (["<|im_start|>"], "assistant"), ["<img>", "</img>"], multi_image=True,
                                     tiles=True),
    # the wide image (256 x 128) gets 2 tiles besides the global view, the square one (128 x 128) none
    "unlimited_ocr": ProcessorSpec(_unlimited_ocr, (["<|Assistant|>"], ":"), multi_image=True, tiles=True,
                                   sizes=((256, 128), (128, 128))),
    "deepseek_ocr2": ProcessorSpec(_deepseek_ocr2, ([], "?"), question_ends_prompt=True, model=_deepseek_ocr2_model,
                                   sizes=((768, 384), (384, 384))),
}
