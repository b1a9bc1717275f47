"""The top candidate answers to one question about one image (first-token probabilities); the
default image (the first easy-VQA test image) that examples and scripts use."""
from __future__ import annotations

import torch

from .adapters import get_adapter
from .data import easy_vqa_images


def default_image():
    paths = easy_vqa_images("test")
    return paths[sorted(paths)[0]]


@torch.no_grad()
def top_answers(model, processor, image, question, top=3):
    ad = get_adapter(model, processor)
    inputs = ad.encode([image], [question])
    logits = model(**inputs).logits[0, -1].float()
    probs = logits.softmax(-1)
    p, i = probs.topk(top)
    tok = processor.tokenizer
    return [(tok.decode([int(t)]).strip(), float(pp), float(logits[t])) for pp, t in zip(p, i)]
