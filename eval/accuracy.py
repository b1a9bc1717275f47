"""VQA scoring: closed-vocabulary (argmax over the candidate answers' first tokens) or open
(greedy generation, VQAv2 normalisation, soft accuracy), per question type, bootstrap CIs."""
from __future__ import annotations

import re

import numpy as np
import torch

from headsteer.adapters import get_adapter

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:.']")


def normalize_answer(s: str) -> str:
    """VQAv2-style: lower-case, drop punctuation and articles, number words to digits."""
    s = _PUNCT.sub(" ", s.lower().strip())
    words = [_NUMBERS.get(w, w) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


def soft_accuracy(pred: str, answers) -> float:
    """VQAv2 accuracy: min(1, matching human answers / 3); exact match when one reference."""
    p = normalize_answer(pred)
    refs = [normalize_answer(a) for a in answers]
    if len(refs) <= 1:
        return float(bool(refs) and p == refs[0])
    return min(1.0, sum(r == p for r in refs) / 3.0)


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@torch.no_grad()
def predict_closed(model, processor, images, questions, candidates: list[str]) -> tuple[list[str], torch.Tensor]:
    """Argmax over the candidate answers' first tokens; also the full last-position logits."""
    ad = get_adapter(model, processor)
    ids = [ad.answer_token_id(c, questions[0]) for c in candidates]
    logits = model(**ad.encode(images, questions), logits_to_keep=1).logits[:, -1].float()
    best = logits[:, ids].argmax(-1).tolist()
    return [candidates[b] for b in best], logits


@torch.no_grad()
def predict_open(model, processor, images, questions, max_new_tokens: int = 10) -> list[str]:
    ad = get_adapter(model, processor)
    inputs = ad.encode(images, questions)
    tok = processor.tokenizer
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return [s.strip() for s in tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


def summarize(rows: list[dict], key: str = "correct", seed: int = 0) -> dict:
    """Overall and per-question-type mean of ``key`` with bootstrap CIs."""
    out = {}
    groups = {"all": rows}
    for r in rows:
        groups.setdefault(r.get("qtype") or "all", []).append(r) if (r.get("qtype") or "all") != "all" else None
    for name, rs in groups.items():
        vals = [float(r[key]) for r in rs]
        lo, hi = bootstrap_ci(vals, seed=seed)
        out[name] = {"accuracy": float(np.mean(vals)) if vals else float("nan"), "ci": [lo, hi], "n": len(vals)}
    return out
