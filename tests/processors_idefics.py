"""Real processors of the Idefics-like and other families on their tiny models: SmolVLM,
Granite-Docling, Idefics2, ShieldGemma 2, Aria, Fuyu."""
from contextlib import contextmanager
from unittest import mock

import transformers as tf
import transformers.processing_utils as processing_utils
from transformers.models.granite_docling.image_processing_pil_granite_docling import GraniteDoclingImageProcessorPil
from transformers.models.smolvlm import processing_smolvlm
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
from transformers.video_processing_utils import VideoProcessorMixin

from processors_core import IDEFICS3_ROWS
from tiny_processors import ProcessorSpec, make_tokenizer, template


@contextmanager
def _video_processor_check():
    """transformers exports VideoProcessorMixin only where torchvision is installed, and a processor
    that holds a video processor checks its class against it: without torchvision even
    ``video_processor=None`` fails (VIDEO_PROCESSOR_MAPPING is a placeholder). Expose the class for the
    duration of the constructor so the real check runs against the real (unused) video processor."""
    with mock.patch.object(processing_utils.transformers_module, "VideoProcessorMixin", VideoProcessorMixin, create=True):
        yield


def _smolvlm():
    # SmolVLMProcessor refuses to build without num2words, which it uses only for video prompts
    # (frame counts in words): a stand-in for the constructor's check; images never reach it
    tok = make_tokenizer(specials=("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>",
                                   *IDEFICS3_ROWS))
    # as Idefics3: resized to a multiple of 32 (longest edge 64), split into 32x32 tiles plus a global view
    ip = SmolVLMImageProcessorPil(do_image_splitting=True, size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    with _video_processor_check(), mock.patch.object(processing_smolvlm, "num2words", str):
        return tf.SmolVLMProcessor(ip, tok, SmolVLMVideoProcessor(), image_seq_len=4,
                                   chat_template=template("<|im_start|>User:", "<end_of_utterance>\n", "Assistant:", "<image>"))


def _granite_docling():
    tok = make_tokenizer(specials=("<image>", "<fake_token_around_image>", "<global-img>", "<|start_of_role|>", "<|end_of_role|>",
                                   "<|end_of_text|>", *IDEFICS3_ROWS))
    # 32x32 tiles on the grid closest to the image's aspect (at most 4), plus a thumbnail when split;
    # a one-tile image gets neither the thumbnail nor a closing <fake_token_around_image>
    ip = GraniteDoclingImageProcessorPil(size={"height": 32, "width": 32}, max_patches=4)
    return tf.GraniteDoclingProcessor(ip, tok, image_seq_len=4, chat_template=template(
        "<|start_of_role|>user<|end_of_role|>", "<|end_of_text|>\n", "<|start_of_role|>assistant<|end_of_role|>", "<image>"))


SPECS: dict[str, ProcessorSpec] = {
    "smolvlm": ProcessorSpec(_smolvlm, (["Assistant"], ":"), ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>",
                                                               "<row_1_col_2>"], multi_image=True, tiles=True),
    "granite_docling": ProcessorSpec(_granite_docling, (["<|start_of_role|>", "assistant"], "<|end_of_role|>"),
                                     ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_1_col_3>"],
                                     multi_image=True, tiles=True),
}
