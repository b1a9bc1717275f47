"""Real processors of the OCR and DeepSeek/Janus/Ovis families on their tiny models: GOT-OCR 2.0
(no chat template: headsteer writes the processor's own turns), PP-Chart2Table (GOT-OCR 2.0's model),
DeepSeek-VL, DeepSeek-VL hybrid, Janus, Ovis2 (tiles, naive path only).

DeepSeek-OCR 2 is not here: its prompt is plain "<image>\n{question}" (no chat turns), so the prompt
ends with the question's last word and test_token_groups_follow_the_chat_template (question == every
word, a separate last token) does not apply as written."""
import transformers as tf
from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil
from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import DeepseekVLHybridImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil
from transformers.models.ovis2.image_processing_pil_ovis2 import Ovis2ImageProcessorPil
from transformers.models.pp_chart2table.image_processing_pil_pp_chart2table import PPChart2TableImageProcessorPil

from tiny_models import IMG
from tiny_processors import ProcessorSpec, feature_counts, make_tokenizer, template

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


SPECS = {
    "got_ocr2": ProcessorSpec(_got_ocr2, (["<|im_start|>"], "assistant"), ["<img>", "</img>"]),
    "pp_chart2table": ProcessorSpec(_pp_chart2table, (["<|im_start|>"], "assistant"), ["<img>", "</img>"]),
    "deepseek_vl": ProcessorSpec(_deepseek_vl, (["Assistant"], ":"), multi_image=True),
    "deepseek_vl_hybrid": ProcessorSpec(_deepseek_vl_hybrid, (["Assistant"], ":"), multi_image=True),
    "janus": ProcessorSpec(_janus, (["<|Assistant|>"], ":"), ["<begin_of_image>", "<end_of_image>"], multi_image=True),
    "ovis2": ProcessorSpec(_ovis2, (["<|im_start|>"], "assistant"), ["<IMG_START>", "<IMG_GRID>", "<IMG_END>"], multi_image=True,
                           tiles=True, feature_counts=_ovis2_counts, fast_refusal="visual indicator tokens"),
}
