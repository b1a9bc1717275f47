"""Top-k ablation curves: ablate the k highest-ranked heads of each ranking (and of random
rankings) on held-out examples; the ranking whose curve falls fastest found the heads that matter."""
from __future__ import annotations

import numpy as np
import torch

from headsteer.adapters import get_adapter

from .regression import statistic
from .run import Evaluator


def topk_masks(ranking, k_max, L, H) -> torch.Tensor:
    masks = torch.zeros(k_max + 1, L, H, dtype=torch.bool)
    for k in range(1, k_max + 1):
        masks[k] = masks[k - 1]
        l, h = ranking[k - 1]
        masks[k, l, h] = True
    return masks


def topk_curves(model, processor, examples, rankings: dict, k_max: int, baseline, stat="logit", n_random=3, seed=0, progress=None):
    """``rankings``: name -> list of (layer, head), best first. Returns name -> {k, stat, accuracy}
    averaged over ``examples`` (dicts with image, question, answer); ``random`` is the mean of
    ``n_random`` random rankings."""
    ad = get_adapter(model, processor)
    L, H = ad.num_layers, ad.num_heads
    rng = np.random.default_rng(seed)
    all_heads = [(l, h) for l in range(L) for h in range(H)]
    rand = [[all_heads[i] for i in rng.permutation(L * H)] for _ in range(n_random)]
    names = list(rankings) + [f"random{i}" for i in range(n_random)]
    blocks = [topk_masks(r, k_max, L, H) for r in list(rankings.values()) + rand]
    masks = torch.cat(blocks)
    stats = np.zeros((len(examples), len(names), k_max + 1))
    correct = np.zeros_like(stats)
    for e, ex in enumerate(examples):
        ev = Evaluator(model, processor, ex["image"], ex["question"], baseline)
        aid = ad.answer_token_id(ex["answer"], ex["question"])
        logits = ev(masks)
        stats[e] = statistic(logits, aid, stat).view(len(names), k_max + 1).numpy()
        correct[e] = (logits.argmax(-1) == aid).view(len(names), k_max + 1).numpy()
        if progress is not None:
            progress(1)
    out = {}
    for j, name in enumerate(list(rankings)):
        out[name] = {"k": list(range(k_max + 1)), "stat": stats[:, j].mean(0).tolist(), "accuracy": correct[:, j].mean(0).tolist()}
    r0 = len(rankings)
    out["random"] = {"k": list(range(k_max + 1)), "stat": stats[:, r0:].mean((0, 1)).tolist(),
                     "accuracy": correct[:, r0:].mean((0, 1)).tolist()}
    return out
