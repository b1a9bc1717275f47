"""Real processors of the GLM-4.xV families (and more 3D-RoPE / packed-pixel families) on their tiny models."""
from __future__ import annotations


import transformers as tf
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
from transformers.models.glm46v.image_processing_pil_glm46v import Glm46VImageProcessorPil
from transformers.models.glmga.image_processing_pil_glmga import GlmgaImageProcessorPil

from tiny_models import IMG
from tiny_processors import ProcessorSpec, make_tokenizer, template, unchecked_video


# -- GLM-4.1V / 4.5V / 4.6V / GLM-OCR / glmga: [gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>... -------
# The processor expands <|image|> into one token per 2x2 merged patch group (dynamic resolution:
# a 32x16 image -> 8 tokens, 16x16 -> 4); the tiny configs' image start/end ids are 88/89.
GLM_IDS = {"<|image|>": IMG, "<|begin_of_image|>": 88, "<|end_of_image|>": 89, "<|video|>": 87}
GLM_SPECIALS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_video|>", "<|end_of_video|>",
                "<think>", "</think>", *GLM_IDS)
GLM_IMAGE = "<|begin_of_image|><|image|><|end_of_image|>"
# GLM-4.1V-Thinking ends the prompt with <|assistant|>\n; GLM-4.5V/4.6V with thinking off
# (enable_thinking=False) with <|assistant|>\n<think></think>
GLM_TEMPLATE = template("[gMASK]<sop><|user|>\n", "", "<|assistant|>\n", GLM_IMAGE)
GLM_NOTHINK_TEMPLATE = template("[gMASK]<sop><|user|>\n", "", "<|assistant|>\n<think></think>", GLM_IMAGE)
GLM_SIZES = ((32, 16), (16, 16))
# patch 4, merge 2: images resize to multiples of 8; min/max pixels count the 2 temporal copies
GLM_IP = dict(patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 2 * 8 * 8, "longest_edge": 2 * 64 * 64})


def _glm(processor_cls, image_processor_cls, chat_template):
    def make():
        tok = make_tokenizer(specials=GLM_SPECIALS, ids=GLM_IDS)
        return unchecked_video(processor_cls, video_processor=None, image_processor=image_processor_cls(**GLM_IP), tokenizer=tok, chat_template=chat_template)
    return make


GLM_AROUND = ["[gMASK]", "<sop>", "<|begin_of_image|>", "<|end_of_image|>"]


def _glm_spec(processor_cls, image_processor_cls, chat_template):
    role = ([], "<|assistant|>") if chat_template is GLM_TEMPLATE else (["<|assistant|>", "<think>"], "</think>")
    return ProcessorSpec(_glm(processor_cls, image_processor_cls, chat_template), role, GLM_AROUND, multi_image=True, tiles=True,
                         sizes=GLM_SIZES)


SPECS: dict[str, ProcessorSpec] = {
    "glm4v": _glm_spec(tf.Glm4vProcessor, Glm4vImageProcessorPil, GLM_TEMPLATE),
    "glm4v_moe": _glm_spec(tf.Glm4vProcessor, Glm4vImageProcessorPil, GLM_NOTHINK_TEMPLATE),  # GLM-4.5V: transformers' Glm4vProcessor
    "glm46v": _glm_spec(tf.Glm46VProcessor, Glm46VImageProcessorPil, GLM_NOTHINK_TEMPLATE),
    "glmga": _glm_spec(tf.Glm46VProcessor, GlmgaImageProcessorPil, GLM_NOTHINK_TEMPLATE),  # glmga runs GLM-4.6V's classes
    "glm_ocr": _glm_spec(tf.Glm46VProcessor, Glm46VImageProcessorPil, GLM_TEMPLATE),
}


# -- ERNIE 4.5 VL: <|begin_of_sentence|>User: Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>...\nAssistant: ------
# The processor also returns moe_mm_token_type_ids (image start/end tokens count as image for the MoE
# routing) besides mm_token_type_ids (image tokens only, for the 3D RoPE index).
ERNIE_NAMED = {"image_token": "<|IMAGE_PLACEHOLDER|>", "image_start_token": "<|IMAGE_START|>", "image_end_token": "<|IMAGE_END|>",
               "video_token": "<|VIDEO_PLACEHOLDER|>", "video_start_token": "<|VIDEO_START|>", "video_end_token": "<|VIDEO_END|>"}
# the real template numbers the images ("Picture 1:", "Picture 2:") and, with thinking off (its
# default), ends the generation prompt with <think>\n\n</think>\n\n
ERNIE_TEMPLATE = ("{% set n = namespace(images=0) %}<|begin_of_sentence|>{% for m in messages %}User: "
                  "{% for c in m['content'] %}{% if c['type'] == 'image' %}{% set n.images = n.images + 1 %}"
                  "Picture {{ n.images }}:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
                  "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '\\nAssistant: <think>\\n\\n</think>\\n\\n' }}{% endif %}")


def _ernie4_5_vl_moe():
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import Ernie4_5_VLMoeImageProcessorPil

    tok = make_tokenizer(ERNIE_NAMED, ("<|begin_of_sentence|>", "<think>", "</think>", "Picture", "1", "2"),
                         ids={"<|IMAGE_PLACEHOLDER|>": IMG, "<|IMAGE_START|>": 88, "<|IMAGE_END|>": 89, "<|VIDEO_PLACEHOLDER|>": 87})
    # patch 4, merge 2 (no temporal copies for images): a 32x16 image -> 8 tokens, 16x16 -> 4
    ip = Ernie4_5_VLMoeImageProcessorPil(patch_size=4, merge_size=2, size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64})
    return unchecked_video(tf.Ernie4_5_VLMoeProcessor, video_processor=None, image_processor=ip, tokenizer=tok, chat_template=ERNIE_TEMPLATE)


SPECS["ernie4_5_vl_moe"] = ProcessorSpec(_ernie4_5_vl_moe, (["Assistant", ":", "<think>"], "</think>"),
                                         ["<|begin_of_sentence|>", "Picture", "<|IMAGE_START|>", "<|IMAGE_END|>"],
                                         multi_image=True, tiles=True, sizes=GLM_SIZES)


# -- PaddleOCR-VL: <|begin_of_sentence|>User: <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>question\nAssistant: -----------
# (its real template puts every image of a turn before its text and ends the user turn with "\n")
PADDLE_TEMPLATE = ("<|begin_of_sentence|>{% for m in messages %}User: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                   "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>{% endif %}{% endfor %}"
                   "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")


def _paddleocr_vl():
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import PaddleOCRVLImageProcessorPil

    tok = make_tokenizer({"image_token": "<|IMAGE_PLACEHOLDER|>"}, ("<|begin_of_sentence|>", "<|end_of_sentence|>", "<|IMAGE_START|>", "<|IMAGE_END|>"),
                         ids={"<|IMAGE_PLACEHOLDER|>": IMG, "<|IMAGE_START|>": 88, "<|IMAGE_END|>": 89})
    # patch 4, merge 2: pixel_values [patches, 3, 4, 4]; a 32x16 image -> 8 tokens, 16x16 -> 4
    ip = PaddleOCRVLImageProcessorPil(patch_size=4, merge_size=2, size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64})
    return tf.PaddleOCRVLProcessor(ip, tok, chat_template=PADDLE_TEMPLATE)


SPECS["paddleocr_vl"] = ProcessorSpec(_paddleocr_vl, (["Assistant"], ":"), ["<|begin_of_sentence|>", "<|IMAGE_START|>", "<|IMAGE_END|>"],
                                      multi_image=True, tiles=True, sizes=GLM_SIZES)


# -- VideoLLaMA3: ChatML (Qwen2 text) with <|image_pad|> x patches; images are not merged (merge_size 1,
# video frames 2): a 32x16 image of 4x4 patches -> 32 tokens, 16x16 -> 16; 1D positions
def _video_llama_3():
    from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import VideoLlama3ImageProcessorPil

    tok = make_tokenizer({"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}, ("<|im_start|>", "<|im_end|>"),
                         ids={"<|image_pad|>": IMG, "<|video_pad|>": 87})
    ip = VideoLlama3ImageProcessorPil(patch_size=4, size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64})
    chat = template("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<|image_pad|>\n")
    return unchecked_video(tf.VideoLlama3Processor, video_processor=None, image_processor=ip, tokenizer=tok, chat_template=chat)


SPECS["video_llama_3"] = ProcessorSpec(_video_llama_3, (["<|im_start|>"], "assistant"), ["<|im_start|>", "<|im_end|>"],
                                       multi_image=True, tiles=True, sizes=GLM_SIZES)


# -- MiniCPM-V 4.6 / 4.7: ChatML (Qwen3.5 text); each image becomes <image_id>k</image_id><image>overview</image>
# then, for a large image, one <slice>...</slice> per crop (rows joined by "\n"); pixels of every crop of
# every image packed side by side into one row [1, 3, patch, sum of patches]
MINICPM_NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
                 "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
                 "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>"}
# MiniCPM-V 4.7's config names the marker ids its canvas RoPE lays out from (tiny model: 88/89, 85/86)
MINICPM_IDS = {"<|image_pad|>": IMG, "<|video_pad|>": 87, "<image>": 88, "</image>": 89, "<slice>": 85, "</slice>": 86}


def _ocr_image_processor(**kw):
    """MiniCPM-OCR's image processor needs torchvision (MiniCPMOcrImageProcessor has no Pil twin). This
    stand-in is MiniCPM-V 4.6's Pil image processor in MiniCPM-OCR's 4x downsampling mode, which is
    what the OCR one does with its default small_image_upsize="always" (its "adaptive" mode, which
    sizes small crops by their glyphs with OpenCV, is left out): the same slicing, resizing to
    multiples of 2 patches, NaViT packing and target sizes, so the same token layout."""
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

    return MiniCPMV4_6ImageProcessorPil(downsample_mode="4x", **kw)


def _minicpm(processor_cls, ocr=False):
    def make():
        from transformers.models.minicpm_ocr.video_processing_minicpm_ocr import MiniCPMOcrVideoProcessor
        from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil
        from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

        tok = make_tokenizer(MINICPM_NAMED, ("<|im_start|>", "<|im_end|>", "0", "1"), ids=MINICPM_IDS)
        # 2x2-pixel patches merged 16x: a 16x16 image -> 4 tokens, no slices; 32x16 -> a 16x48-pixel
        # overview (3 tokens) and two 16x16 slices (4 each). The real video processor only tells the
        # processor its slice mode (its processing needs torchvision).
        # MiniCPM-OCR (merged 4x): 16x16 -> 16 tokens; 32x16 -> a 12x24-pixel overview (18) and two 16x16 slices (16 each)
        ip = (_ocr_image_processor if ocr else MiniCPMV4_6ImageProcessorPil)(patch_size=2, scale_resolution=16)
        video = MiniCPMOcrVideoProcessor() if ocr else MiniCPMV4_6VideoProcessor()
        chat = template("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<|image_pad|>\n")
        return unchecked_video(processor_cls, video_processor=video, image_processor=ip, tokenizer=tok, chat_template=chat)
    return make


def minicpm_feature_counts(model, inputs):
    """Image features per prompt: get_image_features gives one entry per crop (overview, slices); a
    prompt's crops are its <image> and <slice> groups (one image per prompt in these tests)."""
    from tiny_processors import feature_counts

    per_crop = iter(feature_counts(model, inputs))
    ids = inputs["input_ids"]
    crops = ((ids == MINICPM_IDS["<image>"]) | (ids == MINICPM_IDS["<slice>"])).sum(1).tolist()
    return [sum(next(per_crop) for _ in range(n)) for n in crops]


# MiniCPM-V 4.6/4.7 and MiniCPM-OCR: hybrid text stacks (layer 0 a gated delta-net)
for _family, _cls in (("minicpmv4_6", tf.MiniCPMV4_6Processor), ("minicpmv4_7", tf.MiniCPMV4_7Processor),
                      ("minicpm_ocr", tf.MiniCPMOcrProcessor)):
    SPECS[_family] = ProcessorSpec(_minicpm(_cls, ocr=_family == "minicpm_ocr"), (["<|im_start|>"], "assistant"),
                                   ["<image_id>", "0", "</image_id>", "<image>", "</image>", "<slice>", "</slice>"],
                                   multi_image=True, tiles=True, sizes=GLM_SIZES, feature_counts=minicpm_feature_counts)
