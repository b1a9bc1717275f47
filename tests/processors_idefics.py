"""Real processors of the Idefics-like and other families on their tiny models: SmolVLM,
Granite-Docling, Idefics2, Aria.

Not here: ShieldGemma 2 (ShieldGemma2Processor ignores ``text``: it builds one prompt per image x
policy from its chat template, which opens a second user turn after the image and always ends with
the model turn) and Fuyu (transformers 5.24's FuyuProcessor hands FuyuImageProcessorPil.patchify_image
torch tensors it cannot transpose, and drops the first token of the image placeholder text)."""
from unittest import mock

import torch
import transformers as tf
from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil
from transformers.models.granite_docling.image_processing_pil_granite_docling import GraniteDoclingImageProcessorPil
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil
from transformers.models.smolvlm import processing_smolvlm
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

from processors_core import IDEFICS3_ROWS
from tiny_models import IMG, TEXT, tiny
from tiny_processors import ProcessorSpec, make_tokenizer, template, unchecked_video


def _smolvlm():
    # SmolVLMProcessor refuses to build without num2words, which it uses only for video prompts
    # (frame counts in words): a stand-in for the constructor's check; images never reach it
    tok = make_tokenizer(specials=("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>",
                                   *IDEFICS3_ROWS))
    # as Idefics3: resized to a multiple of 32 (longest edge 64), split into 32x32 tiles plus a global view
    ip = SmolVLMImageProcessorPil(do_image_splitting=True, size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    with mock.patch.object(processing_smolvlm, "num2words", str):
        return unchecked_video(tf.SmolVLMProcessor, ip, tok, SmolVLMVideoProcessor(), image_seq_len=4,
                                   chat_template=template("<|im_start|>User:", "<end_of_utterance>\n", "Assistant:", "<image>"))


def _granite_docling():
    tok = make_tokenizer(specials=("<image>", "<fake_token_around_image>", "<global-img>", "<|start_of_role|>", "<|end_of_role|>",
                                   "<|end_of_text|>", *IDEFICS3_ROWS))
    # 32x32 tiles on the grid closest to the image's aspect (at most 4), plus a thumbnail when split;
    # a one-tile image gets neither the thumbnail nor a closing <fake_token_around_image>
    ip = GraniteDoclingImageProcessorPil(size={"height": 32, "width": 32}, max_patches=4)
    return tf.GraniteDoclingProcessor(ip, tok, image_seq_len=4, chat_template=template(
        "<|start_of_role|>user<|end_of_role|>", "<|end_of_text|>\n", "<|start_of_role|>assistant<|end_of_role|>", "<image>"))


def _idefics2():
    # no image splitting (its class default): any image size, one pixel_attention_mask'd view read by
    # the perceiver into image_seq_len (= resampler_n_latents) tokens between two fake tokens
    tok = make_tokenizer(specials=("<image>", "<fake_token_around_image>", "<end_of_utterance>"))
    ip = Idefics2ImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 64})
    return tf.Idefics2Processor(ip, tok, image_seq_len=4, chat_template=template("User:", "<end_of_utterance>\n", "Assistant:", "<image>"))


def _idefics2_model():
    """The tiny Idefics2 with its connector (modality projection + perceiver resampler) drawn wider:
    at the 0.02 init the 4 resampled image tokens move the last logits by ~1e-5, below the tests' 1e-4."""
    model = tiny("idefics2", batch=1)[0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.model.connector.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _aria():
    # every image is resized to a max_image_size longest edge (490 or 980, the only sizes
    # AriaImageProcessorPil takes), padded square (pixel_mask) and read by the projector's queries into
    # size_conversion[max_image_size] tokens. AriaProcessor's own default is 980; its images_kwargs take
    # 490 here (a quarter of the pixels to resize: the tests stay fast)
    tok = make_tokenizer({"image_token": "<|img|>"}, ("<fim_prefix>", "<fim_suffix>", "<|im_start|>", "<|im_end|>"), ids={"<|img|>": IMG})
    proc = tf.AriaProcessor(AriaImageProcessorPil(), tok, size_conversion={490: 4}, chat_template=template(
        "<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<fim_prefix><|img|><fim_suffix>"))
    proc.images_kwargs = {**proc.images_kwargs, "max_image_size": 490}
    return proc


def _aria_model():
    """A tiny Aria whose vision tower takes the processor's 490x490 images: 98-pixel patches, a 5x5
    grid, which the projector maps to 4 queries (tiny_models' Aria takes 32x32 images)."""
    text = dict(TEXT, moe_num_experts=2, moe_topk=1, moe_num_shared_experts=1, model_type="aria_text")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=490, patch_size=98)
    torch.manual_seed(0)
    cfg = tf.AriaConfig(vision_config=vision, text_config=text, projector_patch_to_query_dict={25: 4}, image_token_index=IMG)
    return tf.AriaForConditionalGeneration(cfg).eval()


SPECS: dict[str, ProcessorSpec] = {
    "smolvlm": ProcessorSpec(_smolvlm, (["Assistant"], ":"), ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>",
                                                               "<row_1_col_2>"], multi_image=True, tiles=True),
    "granite_docling": ProcessorSpec(_granite_docling, (["<|start_of_role|>", "assistant"], "<|end_of_role|>"),
                                     ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_1_col_3>"],
                                     multi_image=True, tiles=True),
    "idefics2": ProcessorSpec(_idefics2, (["Assistant"], ":"), ["<fake_token_around_image>"], multi_image=True, model=_idefics2_model),
    "aria": ProcessorSpec(_aria, (["<|im_start|>"], "assistant"), ["<fim_prefix>", "<fim_suffix>"], multi_image=True, model=_aria_model),
}
