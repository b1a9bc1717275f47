"""Shifted VQA tasks for edits: degraded images (low contrast, noise) and renamed answers."""
from __future__ import annotations

import numpy as np
from PIL import Image

from headsteer.data import answer_vocabulary, keep_answer_vocabulary
from headsteer.errors import HeadsteerError


def degrade(image: Image.Image, spec: str, seed: int = 0) -> Image.Image:
    """``contrast:C`` blends the image towards its mean colour (C = remaining contrast, e.g. 0.15);
    ``noise:S`` adds Gaussian noise of std S (pixel range 0-1)."""
    kind, _, val = spec.partition(":")
    try:
        v = float(val)
    except ValueError:
        raise HeadsteerError(f"bad degradation {spec!r}: write contrast:0.15 or noise:0.3") from None
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if kind == "contrast":
        a = a.mean((0, 1), keepdims=True) * (1 - v) + a * v
    elif kind == "noise":
        a = a + np.random.default_rng(seed).normal(0, v, a.shape)
    else:
        raise HeadsteerError(f"unknown degradation {kind!r}: use contrast or noise")
    return Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))


def parse_renames(spec: str) -> dict:
    out = {}
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in pair:
            raise HeadsteerError(f"bad rename {pair!r}: write old=new, e.g. red=green,green=red")
        a, b = pair.split("=", 1)
        out[a.strip()] = b.strip()
    return out


def shifted(dataset, task: str | None):
    """The data set under a task: ``contrast:C``, ``noise:S`` or ``rename:a=b,c=d`` (None: as is)."""
    if not task:
        return dataset
    kind = task.split(":", 1)[0]
    if kind in ("contrast", "noise"):
        return dataset.map(lambda r, i: {"image": degrade(r["image"], task, seed=i)}, with_indices=True)
    if kind == "rename":
        ren = parse_renames(task.split(":", 1)[1])
        vocabulary = [ren.get(a, a) for a in answer_vocabulary(dataset)]  # closed mode scores the renamed answers
        return keep_answer_vocabulary(dataset.map(lambda r: {"answer": ren.get(r["answer"], r["answer"]),
                                                             "answers": [ren.get(a, a) for a in r["answers"]]}), vocabulary)
    raise HeadsteerError(f"unknown task {task!r}: use contrast:C, noise:S or rename:old=new,...")
