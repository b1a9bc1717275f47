"""Real processors of the 3D-RoPE (multimodal RoPE) families on their tiny models: Qwen2-VL, Qwen2.5-VL,
Qwen3-VL (dense and MoE), Qwen3.5 (hybrid, dense and MoE) ...

Their processors expand ``<|image_pad|>`` into one token per 2x2-merged patch between
``<|vision_start|>`` and ``<|vision_end|>``; the image processor (Qwen2VLImageProcessorPil, patch 4,
merge 2, as the tiny vision towers) resizes an image to a multiple of 8 pixels, so a 48x16 image gets
a 4x12 patch grid (12 tokens) and a 16x16 one 4x4 (4 tokens), and the model lays its 3D positions out from
that grid (image_grid_thw) and the token layout."""
from unittest import mock

import transformers as tf
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from tiny_processors import ProcessorSpec, make_tokenizer, template

# the ids the tiny 3D-RoPE models' configs name (tests/tiny_models.py: _qwen_vl, _mrope)
QWEN_IDS = {"<|image_pad|>": 90, "<|vision_start|>": 88, "<|vision_end|>": 89, "<|video_pad|>": 87}
QWEN_AROUND = ["<|vision_start|>", "<|vision_end|>"]
QWEN_ROLE = (["<|im_start|>"], "assistant")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# ChatML as in the Qwen-VL checkpoints (their default system turn left out: it only adds text before the image)
CHATML = template("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", QWEN_IMAGE)


def without_video_processor(cls, *args, **kwargs):
    """``cls(*args, video_processor=None, **kwargs)``. These processors name a video processor, and
    ProcessorMixin checks every sub-processor's class — also a None one — against
    ``transformers.VideoProcessorMixin``, which transformers exports only with torchvision installed.
    The check is skipped for the absent video processor only; the processor is the real class."""
    check = ProcessorMixin.check_argument_for_proper_class

    def skip_none_video(self, name, arg):
        return None if name == "video_processor" and arg is None else check(self, name, arg)

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", skip_none_video):
        return cls(*args, video_processor=None, **kwargs)


def qwen_tokenizer(*specials, named=None):
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", **(named or {})}
    return make_tokenizer(named, ("<|im_start|>", "<|im_end|>", *QWEN_AROUND, *specials), ids=QWEN_IDS)


def qwen_image_processor(**kw):
    # min/max pixels sized for the tiny tower (16x16 .. 32x32-worth), resized to multiples of 8
    return Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2,
                                    size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32}, **kw)


SIZES = ((48, 16), (16, 16))  # a wide image (12 tokens) and a square one (4 tokens)


def _qwen(cls, gen="<|im_start|>assistant\n", specials=()):
    return lambda: without_video_processor(cls, qwen_image_processor(), qwen_tokenizer(*specials),
                                           chat_template=template("<|im_start|>user\n", "<|im_end|>\n", gen, QWEN_IMAGE))


def _spec(cls, role=QWEN_ROLE, **kw):
    return ProcessorSpec(_qwen(cls, **kw), role, QWEN_AROUND, multi_image=True, tiles=True, sizes=SIZES)


SPECS = {
    "qwen2_vl": _spec(tf.Qwen2VLProcessor),
    "qwen2_5_vl": _spec(tf.Qwen2_5_VLProcessor),
    "qwen3_vl": _spec(tf.Qwen3VLProcessor),
    "qwen3_vl_moe": _spec(tf.Qwen3VLProcessor),  # transformers maps qwen3_vl_moe to Qwen3VLProcessor
}
