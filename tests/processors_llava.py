"""Real processors of the LLaVA-style families on their tiny models: LLaVA-OneVision, Granite 4
Vision, VipLLaVA, LLaVA-NeXT-Video, Video-LLaVA, Aya Vision, InternVL, Qianfan-OCR, Mistral 3,
LightOnOCR (each a ``ProcessorSpec``; see tests/tiny_processors.py)."""
import torch
import transformers as tf
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from tiny_models import IMG, SIGLIP, TEXT
from tiny_processors import ProcessorSpec, make_tokenizer, template

PINPOINTS = [[32, 32], [32, 64], [64, 32]]  # anyres: a wide image gets two 32x32 tiles besides the base view
VIDEO = 91  # the video token id of the tiny models built here
CHATML = template("<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<image>\n")  # Qwen2 turns


def without_video_processor(cls):
    """``cls`` (the family's real processor class) built without a video processor.

    ProcessorMixin checks every sub-processor against its base class, and transformers exports the
    video processors' base class (VideoProcessorMixin) only where torchvision works — not here — so
    the real class refuses even ``video_processor=None``. This subclass skips that one check for a
    missing video processor; everything else (prompt expansion, image processing) is the real class's."""

    class NoVideo(cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    NoVideo.__name__ = NoVideo.__qualname__ = cls.__name__
    return NoVideo


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
    return without_video_processor(tf.LlavaOnevisionProcessor)(ip, tok, video_processor=None, num_image_tokens=16,
                                                                vision_feature_select_strategy="full", chat_template=CHATML)


SPECS: dict[str, ProcessorSpec] = {
    "llava_onevision": ProcessorSpec(_llava_onevision, (["<|im_start|>"], "assistant"), multi_image=True, tiles=True,
                                     model=_llava_onevision_model),
}
