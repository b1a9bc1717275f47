"""Answer a question about an image with the top candidate answers (first-token probabilities)."""
from __future__ import annotations

import torch

from .adapters import get_adapter


def default_image():
    from .data import easy_vqa_images

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


def ask(model, image, question, edit_path=None, top=3, device=None, dtype=None, device_map=None):
    from . import load

    m, proc = load(model, device=device, dtype=dtype, device_map=device_map)
    image = image or default_image()
    lines = [f"image     {image}", f"question  {question}"]
    base = top_answers(m, proc, image, question, top)
    lines.append("answer    " + "  ".join(f"{a} ({p:.2f})" for a, p, _ in base))
    if edit_path:
        from .edit import apply_edit, load_manifest

        manifest = load_manifest(edit_path)
        with apply_edit(m, manifest, processor=proc):
            edited = top_answers(m, proc, image, question, top)
        lines.append("edited    " + "  ".join(f"{a} ({p:.2f})" for a, p, _ in edited) + f"   [{manifest.describe()}]")
    return lines
