"""Real processors of the first families tested with them: LLaVA-1.5, LLaVA-NeXT (anyres tiles),
Idefics3 (image splitting), PaliGemma (prefix-LM, no chat template), Gemma 3, Llama 4."""
import torch
import transformers as tf
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from tiny_models import CLIP, IMG, TEXT
from tiny_processors import ProcessorSpec, make_tokenizer, template

LLAVA_TEMPLATE = template("USER: ", " ", "ASSISTANT:", "<image>\n")
PINPOINTS = [[32, 32], [32, 64], [64, 32]]  # anyres: a wide image gets two 32x32 tiles besides the base view


def _llava_next_model():
    cfg = tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**CLIP), text_config=tf.LlamaConfig(**TEXT), image_token_index=IMG,
                             image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1, image_seq_length=16)
    torch.manual_seed(0)
    return tf.LlavaNextForConditionalGeneration(cfg).eval()


LLAVA_KW = dict(patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)


def _llava():
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return tf.LlavaProcessor(ip, make_tokenizer({"image_token": "<image>"}), **LLAVA_KW)


def _llava_next():
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    return tf.LlavaNextProcessor(ip, make_tokenizer({"image_token": "<image>"}), **LLAVA_KW)


IDEFICS3_ROWS = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))


def _idefics3():
    tok = make_tokenizer(specials=("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>", *IDEFICS3_ROWS))
    # images are resized to a multiple of 32 (longest edge 64) and split into 32x32 tiles plus a global view
    ip = Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    return tf.Idefics3Processor(ip, tok, image_seq_len=4,
                                chat_template=template("<|im_start|>User:", "<end_of_utterance>\n", "Assistant:", "<image>"))


def _paligemma():
    ip = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ip.image_seq_length = 16
    return tf.PaliGemmaProcessor(ip, make_tokenizer({"image_token": "<image>"}, specials=("\n",)))


def _gemma3():
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = make_tokenizer(named, ("<start_of_turn>", "<end_of_turn>"),
                         ids={"<image_soft_token>": IMG, "<start_of_image>": 85, "<end_of_image>": 86})
    return tf.Gemma3Processor(Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tok, image_seq_length=4,
                              chat_template=template("<start_of_turn>user\n", "<end_of_turn>\n", "<start_of_turn>model\n",
                                                     "<start_of_image>"))


class OneTileLlama4ImageProcessor(SiglipImageProcessorPil):
    """Llama4ImageProcessor needs torchvision, which headsteer does not depend on. This stand-in gives
    its output for images that fit one tile (no tiling, no global view): pixel_values [1, 3, 32, 32]
    and aspect ratio (1, 1) per image — what the real Llama4Processor lays the prompt out from."""

    def __call__(self, images, **kwargs):
        out = super().__call__(images, **kwargs)
        out["aspect_ratios"] = torch.ones(len(out["pixel_values"]), 2, dtype=torch.long)
        return out


def _llama4():
    # the processor expands <|image|> into <|image_start|><|image|><|patch|> x 4<|image_end|>; the
    # model's image token (config image_token_index) is <|patch|>, not the processor's <|image|>
    tok = make_tokenizer(specials=("<|patch|>", "<|image|>", "<|image_start|>", "<|image_end|>", "<|tile_x_separator|>",
                                   "<|tile_y_separator|>", "<|header_start|>", "<|header_end|>", "<|eot|>"),
                         ids={"<|patch|>": IMG})
    return tf.Llama4Processor(OneTileLlama4ImageProcessor(size={"height": 32, "width": 32}), tok, patch_size=8,
                              chat_template=template("<|header_start|>user<|header_end|>\n\n", "<|eot|>",
                                                     "<|header_start|>assistant<|header_end|>\n\n", "<|image|>"))


SPECS = {
    "llava": ProcessorSpec(_llava, (["ASSISTANT"], ":"), multi_image=True),
    "llava_next": ProcessorSpec(_llava_next, (["ASSISTANT"], ":"), multi_image=True, tiles=True, model=_llava_next_model),
    "idefics3": ProcessorSpec(_idefics3, (["Assistant"], ":"), ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>",
                                                               "<row_1_col_2>"], multi_image=True, tiles=True),
    # no chat template: the processor ends the prompt with "\n"; prefix-LM: the image attends to the prompt after it
    "paligemma": ProcessorSpec(_paligemma, ([], "\n"), ["<s>"], fast_refusal="bidirectionally"),
    "gemma3": ProcessorSpec(_gemma3, (["<start_of_turn>"], "model"), ["<start_of_image>", "<end_of_image>"], multi_image=True),
    "llama4": ProcessorSpec(_llama4, (["<|header_start|>", "assistant"], "<|header_end|>"),
                            ["<|image_start|>", "<|image|>", "<|image_end|>"], multi_image=True),
}
