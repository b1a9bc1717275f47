"""Benchmark adapters on ``datasets``: easy-VQA (built in), VQAv2/GQA/TextVQA-style local files
(image, question, answers), and POPE (yes/no object presence, adversarial/popular/random)."""
from __future__ import annotations

import json
from pathlib import Path

from headsteer.data import (check_question, json_lines, keep_answer_vocabulary, load_data, load_local_vqa, read_rows,
                            vqa_features)
from headsteer.errors import HeadsteerError
from headsteer.images import open_image
from headsteer.paths import read_text


def load_vqa(path, limit=None, qtypes=None):
    """VQAv2 / GQA / TextVQA style: rows with image, question and a list of answers."""
    return load_local_vqa(path, limit=limit, qtypes=qtypes)


def load_pope(path, split: str | None = None, limit=None, qtypes=None):
    """POPE rows (JSONL, or a JSON list): image, question/text, label/answer (yes/no), optional
    category (adversarial / popular / random). ``split`` (or ``qtypes``) keeps those categories.
    Every row is checked (a one-line error names the line)."""
    import datasets

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise HeadsteerError(f"POPE file not found: {path}")
    rows = _pope_rows(path)
    keep = set(qtypes) if qtypes is not None else None
    if split:
        keep = {split} if keep is None else keep & {split}
    out = {"image": [], "question": [], "answer": [], "answers": [], "qtype": []}
    for i, r in enumerate(rows, 1):
        where = f"{path}: row {i}: "
        if not isinstance(r, dict):
            raise HeadsteerError(f"{where}expected an object with image, question and label; got {str(r)[:60]!r}")
        cat = r.get("category") or r.get("split") or "all"
        if not isinstance(cat, str):
            raise HeadsteerError(f"{where}category must be text; got {str(cat)[:60]!r}")
        raw = r.get("label", r.get("answer"))
        ans = raw.strip().lower() if isinstance(raw, str) else None
        if ans not in ("yes", "no"):
            raise HeadsteerError(f"{where}POPE answers are yes/no; found {str(raw)[:60]!r}")
        q = r.get("question") or r.get("text")
        if q is None or r.get("image") in (None, ""):
            raise HeadsteerError(f"{where}POPE rows need image, question (or text) and label (or answer)")
        check_question(q, where)
        if (keep is not None and cat not in keep) or (limit and len(out["image"]) >= limit):
            continue
        out["image"].append(open_image(r["image"], path.parent, name=f"{where}image"))
        out["question"].append(q)
        out["answer"].append(ans)
        out["answers"].append([ans])
        out["qtype"].append(cat)
    return keep_answer_vocabulary(datasets.Dataset.from_dict(out, features=vqa_features()), ["no", "yes"])


def _pope_rows(path: Path) -> list:
    """A POPE file's rows: JSON lines whatever the suffix (the official files are ``.json`` holding one
    object per line), or a JSON list."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".parquet"):
        return read_rows(path, "POPE file")
    text = read_text(path, "POPE file")
    if text.lstrip().startswith("["):
        return _json_list(text, path)
    return json_lines(text, path)


def _json_list(text: str, path: Path) -> list:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise HeadsteerError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}): fix that line") from None


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
        return load_pope(path, split or None, limit, qtypes=qtypes)
    if spec.startswith("vqa:"):
        return load_vqa(spec[4:], limit, qtypes=qtypes)
    return load_data(spec, limit=limit, qtypes=qtypes)
