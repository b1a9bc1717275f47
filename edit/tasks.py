"""Shifted VQA tasks for edits: degraded images (low contrast, noise) and renamed answers."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from headsteer.data import answer_vocabulary, keep_answer_vocabulary
from headsteer.errors import HeadsteerError

# the values each degradation takes: contrast is the share of the contrast kept (0: a flat image,
# 1: unchanged; more would clip), noise a standard deviation in the 0-1 pixel range (0: none)
RANGES = {"contrast": (0.0, 1.0), "noise": (0.0, math.inf)}


def degradation(spec: str) -> tuple[str, float]:
    """(kind, value) of ``contrast:C`` or ``noise:S``; a one-line refusal of anything else, NaN and
    infinities included (they would make every pixel NaN and then 0)."""
    kind, _, val = spec.partition(":")
    if kind not in RANGES:
        raise HeadsteerError(f"unknown degradation {kind!r}: use contrast or noise")
    try:
        v = float(val)
    except ValueError:
        raise HeadsteerError(f"bad degradation {spec!r}: write contrast:0.15 or noise:0.3") from None
    lo, hi = RANGES[kind]
    if not math.isfinite(v) or not lo <= v <= hi:
        what = f"from {lo:g} to {hi:g}" if math.isfinite(hi) else f"of at least {lo:g}"
        raise HeadsteerError(f"bad degradation {spec!r}: {kind} takes a finite number {what}")
    return kind, v


def degrade(image: Image.Image, spec: str, seed: int = 0) -> Image.Image:
    """``contrast:C`` blends the image towards its mean colour (C = remaining contrast, e.g. 0.15);
    ``noise:S`` adds Gaussian noise of std S (pixel range 0-1)."""
    kind, v = degradation(spec)
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if kind == "contrast":
        a = a.mean((0, 1), keepdims=True) * (1 - v) + a * v
    else:
        a = a + np.random.default_rng(seed).normal(0, v, a.shape)
    return Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))


def parse_renames(spec: str) -> dict:
    out = {}
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in pair:
            raise HeadsteerError(f"bad rename {pair!r}: write old=new, e.g. red=green,green=red")
        a, b = (x.strip() for x in pair.split("=", 1))
        if not a or not b:
            raise HeadsteerError(f"bad rename {pair!r}: both answers must be non-empty, e.g. red=green")
        out[a] = b
    if not out:
        raise HeadsteerError(f"rename:{spec} renames nothing: write rename:old=new,...")
    return out


def check_task(task: str | None) -> str | None:
    """``task`` if it is a valid task (see ``shifted``): checked before any model or data loads."""
    if not task:
        return task
    kind, _, rest = task.partition(":")
    if kind in RANGES:
        degradation(task)
    elif kind == "rename":
        parse_renames(rest)
    else:
        raise HeadsteerError(f"unknown task {task!r}: use contrast:C, noise:S or rename:old=new,...")
    return task


def shifted(dataset, task: str | None):
    """The data set under a task: ``contrast:C``, ``noise:S`` or ``rename:a=b,c=d`` (None: as is)."""
    if not task:
        return dataset
    check_task(task)
    kind = task.split(":", 1)[0]
    if kind in ("contrast", "noise"):
        return dataset.map(lambda r, i: {"image": degrade(r["image"], task, seed=i)}, with_indices=True)
    if kind == "rename":
        ren = parse_renames(task.split(":", 1)[1])
        vocabulary = [ren.get(a, a) for a in answer_vocabulary(dataset)]  # closed mode scores the renamed answers
        return keep_answer_vocabulary(dataset.map(lambda r: {"answer": ren.get(r["answer"], r["answer"]),
                                                             "answers": [ren.get(a, a) for a in r["answers"]]}), vocabulary)
    raise HeadsteerError(f"unknown task {task!r}: use contrast:C, noise:S or rename:old=new,...")
