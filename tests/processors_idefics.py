"""Real processors of the Idefics-like and other families on their tiny models: SmolVLM,
Granite-Docling, Idefics2, Aria, Fuyu (with documented stand-ins where transformers 5.24's FuyuProcessor
breaks: it hands FuyuImageProcessorPil.patchify_image torch tensors it cannot transpose, and drops the
first token of the image placeholder text, a "▁" only a sentencepiece tokenizer writes).

ShieldGemma 2: ShieldGemma2Processor ignores ``text`` and builds one prompt per image x policy from its
chat template; headsteer asks the question as the policy (adapters.OWN_PROMPT_PROCESSORS). Its template
opens a second user turn after the image, wraps the question in its policy instruction, and always ends
with the model turn (adapters.MODEL_TURNS)."""
import math
from unittest import mock

import numpy as np

import torch
import transformers as tf
from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil
from transformers.models.granite_docling.image_processing_pil_granite_docling import GraniteDoclingImageProcessorPil
from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil
from transformers.models.smolvlm import processing_smolvlm
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

from processors_core import IDEFICS3_ROWS
from tiny_models import IMG, TEXT, tiny
from tiny_processors import SIZES, ProcessorSpec, image, make_tokenizer, template, unchecked_video


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


# ShieldGemma 2's chat template as its conversion script (convert_shieldgemma2_weights_orbax_to_hf.py) writes it:
# every content item opens a user turn (so the policy text opens a second one after the image), and it
# always ends with the model turn, add_generation_prompt or not
SHIELDGEMMA2_TEMPLATE = r"""{{ bos_token }}
{%- for message in messages -%}
    {%- if message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {{ '<start_of_turn>user\n' }}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ 'You are a policy expert trying to help determine whether a generated or real image is in' }}
                {{ ' violation of the safety policy below. Your decision must very clearly follow the specific'}}
                {{ ' language used in the safety policy and should not include any interpretation outside of the' }}
                {{ ' safety policy.\n\n' }}
                {{ '<BEGIN_SAFETY_POLICY>\n' }}
                {{ item['text'] + '\n' }}
                {{ '</END_SAFETY_POLICY>\n\n' }}
                {{ 'Does the image violate the above policy? Your Answer must start with \'Yes\' or \'No\'.' }}
                {{ '<end_of_turn>\n' }}
            {%- endif -%}
        {%- endfor -%}
        {{'<start_of_turn>model\n'}}
    {%- else -%}
        {{ raise_exception("Conversation messages must contain iterable content containing images and policy definitions in text.") }}
    {%- endif -%}
{%- endfor -%}
"""


def _shieldgemma2():
    # Gemma 3's tokens: <start_of_image> is the placeholder the template writes, which the processor
    # expands to <start_of_image> + image_seq_length x <image_soft_token> + <end_of_image>
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = make_tokenizer(named, ("<start_of_turn>", "<end_of_turn>"),
                         ids={"<image_soft_token>": IMG, "<start_of_image>": 85, "<end_of_image>": 86})
    return tf.ShieldGemma2Processor(Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tok, image_seq_length=4,
                                    chat_template=SHIELDGEMMA2_TEMPLATE)


class TorchPatchifyFuyuImageProcessor(FuyuImageProcessorPil):
    """transformers 5.24's FuyuProcessor hands ``patchify_image`` the torch tensors the Pil image processor
    returns, which its numpy code cannot transpose; this stand-in takes them through numpy and back."""

    def patchify_image(self, image, patch_size=None):
        return torch.from_numpy(np.asarray(super().patchify_image(image.numpy(), patch_size)))


class PrefixSpaceTokenizer(tf.PreTrainedTokenizerFast):
    """FuyuProcessor drops the first token of its image placeholder text (``|SPEAKER| ... |NEWLINE|<s>``),
    the lone "▁" that Fuyu's sentencepiece tokenizer puts before a text opening with a special token.
    This stand-in for that tokenizer's one behaviour writes the "▁" (a special token here)."""

    def __call__(self, text=None, *args, **kwargs):
        if isinstance(text, str) and text.startswith("|SPEAKER|"):
            text = "▁" + text
        return super().__call__(text, *args, **kwargs)


def _fuyu_image_processor():
    # fit in 32x32 (keeping the aspect ratio), cut into 8x8 patches: a row of |SPEAKER| per patch row
    return TorchPatchifyFuyuImageProcessor(size={"height": 32, "width": 32}, patch_size={"height": 8, "width": 8})


def _fuyu():
    # the processor prepends |SPEAKER| to the prompt, expands it into rows of |SPEAKER| each closed by
    # |NEWLINE|, then <s>, the prompt and <0x04> (beginning of answer)
    tok = make_tokenizer(specials=("|SPEAKER|", "|NEWLINE|", "<0x04>", "▁"), ids={"|SPEAKER|": IMG}, cls=PrefixSpaceTokenizer)
    return tf.FuyuProcessor(_fuyu_image_processor(), tok)


def _fuyu_feature_counts(model, inputs):
    """Fuyu's get_image_features makes one flat [patches, hidden] tensor of the whole batch, filled into
    the image tokens in order. Per image (test_image_mask's images have SIZES): the 8x8 patches covering
    the resized image, which add up to the model's features."""
    ip = _fuyu_image_processor()
    counts = []
    for size in SIZES:
        out = ip([image(0, size)])
        h, w = out["image_unpadded_heights"][0][0], out["image_unpadded_widths"][0][0]
        counts.append(math.ceil(h / 8) * math.ceil(w / 8))
    with torch.no_grad():
        assert len(model.model.get_image_features(inputs["image_patches"]).last_hidden_state) == sum(counts)
    return counts


SPECS: dict[str, ProcessorSpec] = {
    "smolvlm": ProcessorSpec(_smolvlm, (["Assistant"], ":"), ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>",
                                                               "<row_1_col_2>"], multi_image=True, tiles=True),
    "granite_docling": ProcessorSpec(_granite_docling, (["<|start_of_role|>", "assistant"], "<|end_of_role|>"),
                                     ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_1_col_3>"],
                                     multi_image=True, tiles=True),
    "idefics2": ProcessorSpec(_idefics2, (["Assistant"], ":"), ["<fake_token_around_image>"], multi_image=True, model=_idefics2_model),
    "aria": ProcessorSpec(_aria, (["<|im_start|>"], "assistant"), ["<fim_prefix>", "<fim_suffix>"], multi_image=True, model=_aria_model),
    # no chat template: the prompt is the question, ended by the processor's <0x04>
    "fuyu": ProcessorSpec(_fuyu, ([], "<0x04>"), ["|NEWLINE|", "<s>"], tiles=True, feature_counts=_fuyu_feature_counts),
}

# The template writes its policy instruction (a second "<start_of_turn>user" turn, "You are a policy expert
# ... <BEGIN_SAFETY_POLICY>" before the question and "</END_SAFETY_POLICY> Does the image violate the above
# policy? ..." after it) between the image and the model turn: those words are in the "question" group too
# (the ones the tiny vocabulary lacks are <unk>, a special token). One image per prompt (the processor
# refuses more); the template always ends with the model turn.
SPECS["shieldgemma2"] = ProcessorSpec(_shieldgemma2, (["<start_of_turn>"], "model"), ["<start_of_image>", "<end_of_image>"],
                                      question_wrap=(["user", "is", "the", "the", "the", "and", "the"], ["the", "the", "?"]))
