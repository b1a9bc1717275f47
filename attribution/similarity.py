"""Do images of the same semantic class use the same heads even when their appearance differs?

Compares per-image head-score vectors within and across groups: same class / other attribute
(appearance change only), other class / same attribute, other class / other attribute."""
from __future__ import annotations

import numpy as np

from .regression import fit_correlation


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _spearman(a, b):
    # Many heads score exactly alike (often 0): scipy's average ranks keep ties order-free.
    return fit_correlation(a, b)[1]


def group_similarity(scores: np.ndarray, semantic: list, appearance: list) -> dict:
    """``scores`` [N, L, H]; ``semantic``/``appearance`` labels per image (e.g. shape / colour).
    Returns mean cosine and Spearman similarity for each kind of pair, with pair counts."""
    X = scores.reshape(len(scores), -1)
    kinds = {"same_class_other_appearance": [], "other_class_same_appearance": [], "other_class_other_appearance": [],
             "same_class_same_appearance": []}
    for i in range(len(X)):
        for j in range(i + 1, len(X)):
            sc = semantic[i] == semantic[j]
            sa = appearance[i] == appearance[j]
            key = f"{'same' if sc else 'other'}_class_{'same' if sa else 'other'}_appearance"
            kinds[key].append((_cos(X[i], X[j]), _spearman(X[i], X[j])))
    out = {}
    for k, v in kinds.items():
        if v:
            arr = np.array(v)
            out[k] = {"cosine": float(arr[:, 0].mean()), "spearman": float(arr[:, 1].mean()), "pairs": len(v)}
    return out


def easy_vqa_labels(image_ids, split="test") -> tuple[list, list]:
    """(shape, colour) of easy-VQA images, read from the answers of their questions."""
    from headsteer.data import EASY_COLORS, EASY_SHAPES, _easy_records

    q, a, ids, _ = _easy_records(split)
    shape, color = {}, {}
    for ans, i in zip(a, ids):
        if ans in EASY_SHAPES:
            shape[i] = ans
        elif ans in EASY_COLORS:
            color[i] = ans
    return [shape.get(i) for i in image_ids], [color.get(i) for i in image_ids]
