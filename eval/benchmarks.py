"""Benchmark adapters on ``datasets``: easy-VQA (built in), VQAv2/GQA/TextVQA-style local files
(image, question, answers), and POPE (yes/no object presence, adversarial/popular/random)."""
from __future__ import annotations

import json
from pathlib import Path

from headsteer.data import _open_image, keep_answer_vocabulary, load_data, load_local_vqa, vqa_features
from headsteer.errors import HeadsteerError


def load_vqa(path, limit=None):
    """VQAv2 / GQA / TextVQA style: rows with image, question and a list of answers."""
    return load_local_vqa(path, limit=limit)


def load_pope(path, split: str | None = None, limit=None):
    """POPE jsonl rows: image, question/text, label/answer (yes/no), optional category
    (adversarial / popular / random). ``split`` keeps one category."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise HeadsteerError(f"POPE file not found: {path}")
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    out = {"image": [], "question": [], "answer": [], "answers": [], "qtype": []}
    for r in rows:
        cat = r.get("category") or r.get("split") or "all"
        if split and cat != split:
            continue
        ans = str(r.get("label", r.get("answer", ""))).strip().lower()
        if ans not in ("yes", "no"):
            raise HeadsteerError(f"{path}: POPE answers are yes/no; found {ans!r}")
        q = r.get("question") or r.get("text")
        if q is None or "image" not in r:
            raise HeadsteerError(f"{path}: POPE rows need image, question (or text) and label (or answer)")
        out["image"].append(_open_image(r["image"], path.parent))
        out["question"].append(q)
        out["answer"].append(ans)
        out["answers"].append([ans])
        out["qtype"].append(cat)
        if limit and len(out["image"]) >= limit:
            break
    return keep_answer_vocabulary(datasets.Dataset.from_dict(out, features=vqa_features()), ["no", "yes"])


def pope_metrics(rows: list[dict]) -> dict:
    """Accuracy, precision, recall, F1 ('yes' is positive) and the yes-ratio, overall and per split."""
    def m(rs):
        tp = sum(r["prediction"] == "yes" and r["answer"] == "yes" for r in rs)
        fp = sum(r["prediction"] == "yes" and r["answer"] == "no" for r in rs)
        fn = sum(r["prediction"] != "yes" and r["answer"] == "yes" for r in rs)
        acc = sum(r["prediction"] == r["answer"] for r in rs) / max(1, len(rs))
        p = tp / (tp + fp) if tp + fp else 0.0
        rc = tp / (tp + fn) if tp + fn else 0.0
        return {"accuracy": acc, "precision": p, "recall": rc, "f1": 2 * p * rc / (p + rc) if p + rc else 0.0,
                "yes_ratio": sum(r["prediction"] == "yes" for r in rs) / max(1, len(rs)), "n": len(rs)}

    out = {"all": m(rows)}
    for cat in sorted({r.get("qtype") for r in rows} - {None, "all"}):
        out[cat] = m([r for r in rows if r.get("qtype") == cat])
    return out


def load_benchmark(spec: str, limit=None, qtypes=None):
    """``easy-vqa[:split]``, ``pope:PATH[:split]``, ``vqa:PATH`` or a plain local path."""
    if spec.startswith("pope:"):
        rest = spec[5:]
        path, _, split = rest.partition("::")
        return load_pope(path, split or None, limit)
    if spec.startswith("vqa:"):
        return load_vqa(spec[4:], limit)
    return load_data(spec, limit=limit, qtypes=qtypes)
