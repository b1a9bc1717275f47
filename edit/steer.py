"""Steering vectors for heads, from data: the mean difference of each head's output at the last
token between two sets of examples, or a logistic-regression probe direction per head."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from headsteer.adapters import get_adapter
from headsteer.baseline import blank_image
from headsteer.errors import HeadsteerError


@torch.no_grad()
def head_outputs(model, processor, images, questions, batch_size: int = 32) -> torch.Tensor:
    """[N, L, H, d]: every head's output (the o_proj input) at the last prompt token."""
    ad = get_adapter(model, processor)
    got = {}
    hooks = [ad.out_proj(l).register_forward_pre_hook(lambda m, a, l=l: got.__setitem__(l, a[0][:, -1].detach()))
             for l in range(ad.num_layers)]
    out = []
    try:
        for i in range(0, len(images), batch_size):
            model(**ad.encode(images[i : i + batch_size], questions[i : i + batch_size]), logits_to_keep=1)
            out.append(torch.stack([got[l].float().view(-1, ad.num_heads, ad.head_dim) for l in range(ad.num_layers)], 1).cpu())
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(out)


def steering_vectors(model, processor, set_a, set_b, method: str = "mean") -> torch.Tensor:
    """[L, H, d] vectors that move a head's output from set B towards set A.

    ``set_a``/``set_b``: lists of (image, question). ``mean``: mean(A) - mean(B). ``probe``: a
    logistic-regression direction per head (scikit-learn), scaled to the mean separation along it."""
    if not set_a or not set_b:
        raise HeadsteerError("steering needs examples in both sets")
    xa = head_outputs(model, processor, [e[0] for e in set_a], [e[1] for e in set_a])
    xb = head_outputs(model, processor, [e[0] for e in set_b], [e[1] for e in set_b])
    diff = xa.mean(0) - xb.mean(0)
    if method == "mean":
        return diff
    if method != "probe":
        raise HeadsteerError(f"unknown steering method {method!r}: use mean or probe")

    L, H, d = diff.shape
    out = torch.zeros(L, H, d)
    y = np.r_[np.ones(len(xa)), np.zeros(len(xb))]
    for l in range(L):
        for h in range(H):
            X = torch.cat([xa[:, l, h], xb[:, l, h]]).numpy()
            w = LogisticRegression(max_iter=1000).fit(X, y).coef_[0]
            w = w / (np.linalg.norm(w) + 1e-12)
            out[l, h] = torch.tensor(w * float(diff[l, h].numpy() @ w), dtype=torch.float32)
    return out


def real_vs_blank_sets(model, processor, dataset, n: int = 64):
    """Set A: examples the model answers correctly with the real image; set B: the same questions
    with a blank image (what the head outputs look like without image information)."""
    ad = get_adapter(model, processor)
    blank = blank_image(processor)
    a, b = [], []
    with torch.no_grad():
        for i in range(min(n, len(dataset))):
            ex = dataset[i]
            logits = model(**ad.encode([ex["image"]], [ex["question"]]), logits_to_keep=1).logits[0, -1]
            if int(logits.argmax()) == ad.answer_token_id(ex["answer"], ex["question"]):
                a.append((ex["image"], ex["question"]))
                b.append((blank, ex["question"]))
    return a, b


def class_sets(dataset, class_a: str, class_b: str, n: int = 64):
    # Rows are picked from the answer column alone: decoding every row's image to test its answer
    # took 35 s on the easy-VQA train split.
    answers = dataset["answer"]

    def pick(cls):
        rows = dataset.select([i for i, ans in enumerate(answers) if ans == cls][:n])
        return [(r["image"], r["question"]) for r in rows]

    return pick(class_a), pick(class_b)
