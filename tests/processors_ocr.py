"""Real processors of the OCR and DeepSeek/Janus/Ovis families on their tiny models: GOT-OCR 2.0
(no chat template: headsteer writes the processor's own turns), PP-Chart2Table (GOT-OCR 2.0's model),
DeepSeek-VL, DeepSeek-VL hybrid, Janus, Ovis2 (tiles, naive path only); and Molmo2 (overlapping crops
pooled 2x2, a bidirectional image block), Muse Glimmer and Muse Spark (aspect-preserving resize,
patches pixel-shuffled 2x2), whose image processors need torchvision, with documented stand-ins.

DeepSeek-OCR 2 is not here: its prompt is plain "<image>\n{question}" (no chat turns), so the prompt
ends with the question's last word and test_token_groups_follow_the_chat_template (question == every
word, a separate last token) does not apply as written."""
import itertools
import math

import numpy as np
import torch
import transformers as tf
from torch.nn import functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import PILImageResampling, make_flat_list_of_images
from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil
from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import DeepseekVLHybridImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil
from transformers.models.ovis2.image_processing_pil_ovis2 import Ovis2ImageProcessorPil
from transformers.models.pp_chart2table.image_processing_pil_pp_chart2table import PPChart2TableImageProcessorPil

from tiny_models import IMG, molmo2_pooling_per_image
from tiny_processors import ProcessorSpec, feature_counts, make_tokenizer, template, unchecked_video

QWEN_TURNS = ("<|im_start|>", "<|im_end|>")
GOT_SPECIALS = (*QWEN_TURNS, "<img>", "</img>", "<imgpad>", "system")


def _got_tokenizer():
    return make_tokenizer(specials=GOT_SPECIALS, ids={"<imgpad>": 90, "<img>": 85, "</img>": 86})


def _got_ocr2():
    # the checkpoint has no chat template: the processor's own prompt is
    # <|im_start|>system ...<|im_end|><|im_start|>user\n<img><imgpad></img>\n{query}<|im_end|><|im_start|>assistant\n
    # and it expands <imgpad> into num_image_tokens per page (256 for a 1024x1024 page; the tiny SAM
    # tower makes 1 from 64x64)
    proc = tf.GotOcr2Processor(GotOcr2ImageProcessorPil(size={"height": 64, "width": 64}), _got_tokenizer())
    proc.num_image_tokens = 1
    return proc


def _pp_chart2table():
    # the processor expands nothing: the checkpoint's chat template writes <img>, the 256 <imgpad>
    # (1 on the tiny tower) and </img> itself, in Qwen turns (its real template hard-codes the
    # "Chart to table" instruction; this one keeps the question)
    return tf.PPChart2TableProcessor(PPChart2TableImageProcessorPil(size={"height": 64, "width": 64}), _got_tokenizer(),
                                     chat_template=template("<|im_start|>user\n", "<|im_end|>", "<|im_start|>assistant\n",
                                                            "<img><imgpad></img>\n"))


# DeepSeek-VL's conversation: "User: <image_placeholder>{question}\n\nAssistant:"; the processor expands
# <image_placeholder> into num_image_tokens (576 on 384x384; 16 on the tiny 32x32 SigLIP tower)
DEEPSEEK_TEMPLATE = template("User: ", "\n\n", "Assistant:", "<image_placeholder>")


def _deepseek_tokenizer():
    return make_tokenizer({"image_token": "<image_placeholder>"}, ids={"<image_placeholder>": 90})


def _deepseek_vl():
    # the image processor pads a wide image to a square before resizing: one view, 16 tokens
    return tf.DeepseekVLProcessor(DeepseekVLImageProcessorPil(size={"height": 32, "width": 32}), _deepseek_tokenizer(),
                                  num_image_tokens=16, chat_template=DEEPSEEK_TEMPLATE)


def _deepseek_vl_hybrid():
    # a low-res view for the SigLIP tower and a high-res one for the SAM tower, fused into the same 16 tokens
    ip = DeepseekVLHybridImageProcessorPil(size={"height": 32, "width": 32}, high_res_size={"height": 64, "width": 64})
    return tf.DeepseekVLHybridProcessor(ip, _deepseek_tokenizer(), num_image_tokens=16, chat_template=DEEPSEEK_TEMPLATE)


def _janus():
    # the processor expands <image_placeholder> into <begin_of_image> <image_placeholder> x 16 <end_of_image>
    # (576 on 384x384); the conversation is DeepSeek's with <|User|> / <|Assistant|> roles
    named = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}
    tok = make_tokenizer(named, ("<|User|>", "<|Assistant|>"), ids={"<image_placeholder>": IMG})
    return tf.JanusProcessor(JanusImageProcessorPil(size={"height": 32, "width": 32}), tok, num_image_tokens=16,
                             chat_template=template("<|User|>: ", "\n\n", "<|Assistant|>:", "<image_placeholder>\n"))


OVIS2_INDICATORS = ("<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>")  # config visual_indicator_token_ids


def _ovis2():
    # <image> becomes <IMG_START> <IMG_ATOM> x 4 (the global view) <IMG_GRID>, then, when the image is cut
    # into several 32x32 tiles, 4 <IMG_ATOM> per tile separated by <IMG_COL>/<IMG_ROW>, then <IMG_END>;
    # the model's image token is <IMG_ATOM>, the indicators get embeddings of the visual vocabulary
    tok = make_tokenizer(specials=("<image>", "<IMG_ATOM>", *OVIS2_INDICATORS, *QWEN_TURNS),
                         ids={"<IMG_ATOM>": IMG, **{t: 80 + i for i, t in enumerate(OVIS2_INDICATORS)}})
    ip = Ovis2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True)
    return tf.Ovis2Processor(ip, tok, image_seq_length=4,
                             chat_template=template("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<image>\n"))


def _ovis2_counts(model, inputs):
    """Image features per image: the model's features per view (global + tiles), summed over each
    prompt's views (one run of <IMG_ATOM> per view; pixel_values holds every view of the batch)."""
    per_view = iter(feature_counts(model, inputs))
    ids = inputs["input_ids"]
    starts = (ids == IMG) & (ids.roll(1, dims=1) != IMG)
    return [sum(next(per_view) for _ in range(int(n))) for n in starts.sum(1)]


def _molmo2_tiling(height, width, window, max_crops):
    """Molmo2's select_tiling: the (rows, cols) of windows that upscale the image least (or, when every
    tiling must downscale it, downscale it least); ties go to fewer crops, then fewer rows."""
    tilings = sorted(((h, w) for h in range(1, max_crops + 1) for w in range(1, max_crops + 1) if h * w <= max_crops),
                     key=lambda t: (t[0] * t[1], t[0]))
    scale = (torch.tensor(tilings, dtype=torch.float32) * window / torch.tensor([height, width], dtype=torch.float32)).amin(-1)
    if bool((scale < 1).all()):
        return tilings[int(scale.argmax())]
    return tilings[int(torch.where(scale < 1, 10e9, scale).argmin())]


def _molmo2_pooling(grid, pool):
    """Molmo2's arange_for_pooling: a [h, w] patch-index grid cut into pool x pool windows (padded with -1)."""
    ph, pw = (-grid.shape[0]) % pool, (-grid.shape[1]) % pool
    grid = F.pad(grid, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2), value=-1)
    rows, cols = grid.shape[0] // pool, grid.shape[1] // pool
    return grid.reshape(rows, pool, cols, pool).permute(0, 2, 1, 3).reshape(rows * cols, pool * pool), rows, cols


class Molmo2PilImageProcessor(PilBackend):
    """Molmo2ImageProcessor needs torchvision, which headsteer does not depend on. This stand-in follows
    the real class's code (transformers/models/molmo2/image_processing_molmo2.py) step for step, in
    plain torch: per image, a low-res view (the whole image resized to one crop) and overlapping crops
    of a canvas tiled by select_tiling; pixel_values float [crops, patches per crop, patch*patch*3] of
    every image's crops in turn; image_token_pooling long [tokens, pool*pool]: per image token, the
    indices of the patches it pools, counted per image (transformers >= 5.25, whose model adds each
    image's offset) or over the whole batch (5.24) (-1: padding; int32, as the real one makes them); image_grids long
    [images, 4] (low-res rows, cols, high-res rows, cols of pooled tokens); image_num_crops long
    [images]. Resizing is bilinear without antialiasing in float, rounded back to bytes, as the real
    one does with torchvision. The checkpoints' 378-pixel crops of 14-pixel patches with margins of 4
    patches become 16-pixel crops of 4-pixel patches with margins of 1, for the tiny vision tower."""

    model_input_names = ["pixel_values", "image_token_pooling", "image_grids", "image_num_crops"]

    def __init__(self, crop_size=16, patch_size=4, pooling=2, overlap_margins=(1, 1), max_crops=8, **kwargs):
        super().__init__(**kwargs)
        self.crop_size, self.patch_size, self.pooling = crop_size, patch_size, pooling
        self.overlap_margins, self.max_crops = list(overlap_margins), max_crops

    def _resize(self, image, height, width):  # uint8 [C, H, W] -> normalized float [C, height, width]
        out = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]
        return (out.round().clamp(0, 255) / 255 - 0.5) / 0.5  # IMAGENET_STANDARD mean and std

    def _patches(self, crops):  # [N, C, S, S] -> [N, patches, patch*patch*C] (patch rows, then (y, x, channel))
        n, c, s, p = *crops.shape[:3], self.patch_size
        x = crops.permute(0, 2, 3, 1).reshape(n, s // p, p, s // p, p, c).transpose(2, 3)
        return x.reshape(n, (s // p) ** 2, p * p * c)

    def _one(self, image):
        left, right = self.overlap_margins
        s, p = self.crop_size, self.patch_size
        crop_patches = s // p
        window = (crop_patches - left - right) * p
        margin = (left + right) * p
        c, h, w = image.shape
        th, tw = _molmo2_tiling(h - margin, w - margin, window, self.max_crops)
        canvas = self._resize(image, th * window + margin, tw * window + margin)
        crops = canvas.unfold(1, s, window).unfold(2, s, window).permute(1, 2, 0, 3, 4).reshape(th * tw, c, s, s)
        index = torch.arange(th * tw * crop_patches ** 2, dtype=torch.int32).reshape(th, tw, crop_patches, crop_patches)
        if left:
            index[1:, :, :left, :] = -1
            index[:, 1:, :, :left] = -1
        if right:
            index[:-1, :, -right:, :] = -1
            index[:, :-1, :, -right:] = -1
        index = index.permute(0, 2, 1, 3).reshape(-1)
        index = index[index >= 0].reshape((th * window + margin) // p, (tw * window + margin) // p)
        high, rows, cols = _molmo2_pooling(index, self.pooling)
        low, low_rows, low_cols = _molmo2_pooling(torch.arange(crop_patches ** 2, dtype=torch.int32).reshape(crop_patches, crop_patches), self.pooling)
        pooling = torch.cat([low, torch.where(high >= 0, high + crop_patches ** 2, -1)])
        crops = torch.cat([self._resize(image, s, s)[None], crops])  # the low-res view first
        return self._patches(crops), pooling, [low_rows, low_cols, rows, cols]

    def __call__(self, images, return_tensors=None, **kwargs):
        pixels, pooled, grids, offset = [], [], [], 0
        per_image = molmo2_pooling_per_image()
        for im in make_flat_list_of_images(images):
            image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
            patches, pooling, grid = self._one(image)
            pooled.append(pooling if per_image else torch.where(pooling >= 0, pooling + offset, -1))
            pixels.append(patches)
            grids.append(grid)
            offset += patches.shape[0] * patches.shape[1]
        return BatchFeature({"pixel_values": torch.cat(pixels), "image_token_pooling": torch.cat(pooled),
                             "image_grids": torch.tensor(grids), "image_num_crops": torch.tensor([len(x) for x in pixels])},
                            tensor_type=return_tensors)


MOLMO2_MARKERS = ("<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>", "<im_end>", "<frame_end>", "<im_low>")


def _molmo2():
    # <|image|> becomes <low_res_im_start> (<im_patch> x 2 <im_col>) x 2 <im_end> (the low-res view, pooled
    # 2x2) then <im_start> (<im_patch> x cols <im_col>) x rows <im_end> (the overlapping crops, pooled);
    # the model's image token is <im_patch>. Every token of that block is marked in mm_token_type_ids,
    # and the model lets the marked tokens attend to each other bidirectionally. The processor prepends
    # the tokenizer's BOS; the turns are Qwen's (the checkpoints' tokenizer is Qwen3's)
    tok = make_tokenizer(specials=("<|image|>", "<|video|>", "<im_patch>", *MOLMO2_MARKERS, *QWEN_TURNS),
                         ids={"<im_patch>": IMG, "<im_start>": 88, "<im_end>": 89, "<low_res_im_start>": 87,
                              "<frame_start>": 86, "<frame_end>": 85})  # the tiny config's token ids
    return unchecked_video(tf.Molmo2Processor, Molmo2PilImageProcessor(), None, tok,
                           chat_template=template("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<|image|>"))


def _muse_size(height, width, cell, max_tokens):
    """Muse Glimmer's smart_resize: the (height, width) in pixels of the grid of cell x cell merged tokens
    nearest the image's aspect ratio, under the token cap."""
    ih, iw = height / cell, width / cell
    if ih * iw > max_tokens:
        ih = (max_tokens / (iw / ih)) ** 0.5
        iw = ih * (width / height)
    grids = [(h, w) for h, w in set(itertools.product([math.floor(ih), math.ceil(ih)], [math.floor(iw), math.ceil(iw)]))
             if h >= 1 and w >= 1 and h * w <= max_tokens] or [(max(1, round(ih)), max(1, round(iw)))]
    h, w = min(grids, key=lambda g: abs(g[0] / g[1] - height / width))
    return h * cell, w * cell


class MuseGlimmerPilImageProcessor(PilBackend):
    """MuseGlimmerImageProcessor needs torchvision, which headsteer does not depend on. This stand-in
    follows the real class's code (transformers/models/muse_glimmer/image_processing_muse_glimmer.py):
    each image resized (LANCZOS, as PIL does it: the real class names PIL's LANCZOS as the reference)
    to the merged-token grid nearest its aspect ratio, rescaled and normalized (mean = std = 0.5), cut
    into patch x patch patches in raster order, each repeated over temporal_patch_size frames and
    flattened (frame, channel, y, x); pixel_values float [patches of every image, 2*3*patch*patch],
    image_grid_thw long [images, 3] = (1, rows, cols). The checkpoints' 14-pixel patches become 4-pixel
    ones, for the tiny vision tower; the cap of 4096 merged tokens is the real default."""

    model_input_names = ["pixel_values", "image_grid_thw"]

    def __init__(self, patch_size=4, temporal_patch_size=2, merge_size=2, max_image_tokens=4096, **kwargs):
        super().__init__(**kwargs)
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.max_image_tokens = max_image_tokens

    def __call__(self, images, return_tensors=None, **kwargs):
        pixels, grids, p = [], [], self.patch_size
        for im in make_flat_list_of_images(images):
            im = im.convert("RGB")
            h, w = _muse_size(im.height, im.width, p * self.merge_size, self.max_image_tokens)
            x = torch.from_numpy(np.array(im.resize((w, h), PILImageResampling.LANCZOS))).permute(2, 0, 1)
            x = (x.float() / 255 - 0.5) / 0.5
            gh, gw = h // p, w // p
            x = x.reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4)  # [gh, gw, C, p, p]
            x = x[:, :, None].expand(-1, -1, self.temporal_patch_size, -1, -1, -1)
            pixels.append(x.reshape(gh * gw, -1))
            grids.append([1, gh, gw])
        return BatchFeature({"pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor(grids)}, tensor_type=return_tensors)


MUSE_NAMED = {"image_token": "<|patch|>", "image_start_token": "<|image_start|>", "image_end_token": "<|image_end|>",
              "video_token": "<|video|>"}
MUSE_TURNS = ("<|header_start|>", "<|header_end|>", "<|eot|>", "<|vid_start|>", "<|vid_end|>", "<|vid_frame_separator|>")
# a cut-down template (the checkpoints' is not available offline): header turns as Llama 4's, the
# image placeholder <|patch|> before the question
MUSE_TEMPLATE = template("<|header_start|>user<|header_end|>\n\n", "<|eot|>", "<|header_start|>assistant<|header_end|>\n\n",
                         "<|patch|>")


def _muse_glimmer():
    # the processor expands <|patch|> into <|image_start|> <|patch|> x (patches / 4) <|image_end|>
    tok = make_tokenizer(MUSE_NAMED, MUSE_TURNS, ids={"<|patch|>": IMG, "<|video|>": 87})  # the tiny config's ids
    return unchecked_video(tf.MuseGlimmerProcessor, MuseGlimmerPilImageProcessor(), None, tok, chat_template=MUSE_TEMPLATE)


def _muse_spark():
    # Muse Glimmer's image path (the image processor is Glimmer's); the processor also holds the real
    # audio feature extractor (never called here) and names <|audio|> (the tiny config's audio id)
    tok = make_tokenizer(MUSE_NAMED, (*MUSE_TURNS, "<|audio|>", "<|soft_audio_start|>", "<|soft_audio_end|>"),
                         ids={"<|patch|>": IMG, "<|video|>": 87, "<|audio|>": 86})
    return unchecked_video(tf.MuseSparkProcessor, MuseGlimmerPilImageProcessor(), None, tok, tf.MuseSparkFeatureExtractor(),
                           chat_template=MUSE_TEMPLATE)


SPECS = {
    "got_ocr2": ProcessorSpec(_got_ocr2, (["<|im_start|>"], "assistant"), ["<img>", "</img>"]),
    "pp_chart2table": ProcessorSpec(_pp_chart2table, (["<|im_start|>"], "assistant"), ["<img>", "</img>"]),
    "deepseek_vl": ProcessorSpec(_deepseek_vl, (["Assistant"], ":"), multi_image=True),
    "deepseek_vl_hybrid": ProcessorSpec(_deepseek_vl_hybrid, (["Assistant"], ":"), multi_image=True),
    "janus": ProcessorSpec(_janus, (["<|Assistant|>"], ":"), ["<begin_of_image>", "<end_of_image>"], multi_image=True),
    "ovis2": ProcessorSpec(_ovis2, (["<|im_start|>"], "assistant"), ["<IMG_START>", "<IMG_GRID>", "<IMG_END>"], multi_image=True,
                           tiles=True, feature_counts=_ovis2_counts),
    "molmo2": ProcessorSpec(_molmo2, (["<|im_start|>"], "assistant"), ["<low_res_im_start>", "<im_start>", "<im_col>", "<im_end>"],
                            multi_image=True, tiles=True),
    "muse_glimmer": ProcessorSpec(_muse_glimmer, (["<|header_start|>", "assistant"], "<|header_end|>"),
                                  ["<|image_start|>", "<|image_end|>"], multi_image=True, tiles=True),
    "muse_spark": ProcessorSpec(_muse_spark, (["<|header_start|>", "assistant"], "<|header_end|>"),
                                ["<|image_start|>", "<|image_end|>"], multi_image=True, tiles=True),
}
