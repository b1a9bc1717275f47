"""VQA data: the built-in easy-VQA splits and a loader for a user's own local VQA files.

Every example has the columns ``image`` (PIL), ``question``, ``answer``, ``answers`` (list of
reference answers), ``qtype``; easy-VQA adds ``image_id`` and ``object_mask`` (bool [H, W], the
shape's pixels) for the object-vs-background patch analysis.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import datasets
import easy_vqa
import numpy as np
from PIL import Image

from .errors import HeadsteerError

EASY_SHAPES = ("circle", "rectangle", "triangle")
EASY_COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


def easy_vqa_qtype(answer: str) -> str:
    """easy-VQA question type from its answer: ``shape``, ``color`` or ``yes/no``."""
    if answer in EASY_SHAPES:
        return "shape"
    if answer in EASY_COLORS:
        return "color"
    return "yes/no"


def object_mask(image: Image.Image, tol: int = 24) -> np.ndarray:
    """Pixels that differ from the background colour (taken from the four corners)."""
    a = np.asarray(image.convert("RGB"), dtype=np.int16)
    corners = np.stack([a[0, 0], a[0, -1], a[-1, 0], a[-1, -1]])
    bg = np.median(corners, axis=0)
    return np.abs(a - bg).max(axis=-1) > tol


def vqa_features(**extra):
    """The columns every VQA data set here has, plus ``extra``."""
    return datasets.Features({
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "answers": datasets.Sequence(datasets.Value("string")),
        "qtype": datasets.Value("string"),
        **extra,
    })


def _easy_records(split: str):
    if split == "train":
        q, a, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        q, a, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise HeadsteerError(f"unknown easy-VQA split {split!r}: use 'train' or 'test'")
    return q, a, ids, paths


def easy_vqa_images(split: str = "test") -> dict[int, str]:
    """image_id -> path of the easy-VQA images of a split."""
    return _easy_records(split)[3]


def load_easy_vqa(split: str = "test", limit: int | None = None, qtypes=None, with_images: bool = True):
    """easy-VQA as a ``datasets.Dataset``.

    ``qtypes`` keeps only some question types (e.g. ``("shape", "color")``, the object-identification
    questions); ``limit`` keeps the first N remaining questions (the file order is fixed, so this is
    deterministic).
    """
    q, a, ids, paths = _easy_records(split)
    rows = [(qq, aa, ii) for qq, aa, ii in zip(q, a, ids) if qtypes is None or easy_vqa_qtype(aa) in qtypes]
    if limit is not None:
        rows = rows[:limit]
    data = {
        "question": [r[0] for r in rows],
        "answer": [r[1] for r in rows],
        "answers": [[r[1]] for r in rows],
        "qtype": [easy_vqa_qtype(r[1]) for r in rows],
        "image_id": [r[2] for r in rows],
    }
    if with_images:
        cache: dict[int, tuple] = {}
        images, masks = [], []
        for r in rows:
            if r[2] not in cache:
                im = Image.open(paths[r[2]]).convert("RGB")
                cache[r[2]] = (im, object_mask(im))
            images.append(cache[r[2]][0])
            masks.append(cache[r[2]][1].tolist())
        feats = vqa_features(image_id=datasets.Value("int64"), object_mask=datasets.Array2D(shape=(64, 64), dtype="bool"))
        data["image"] = images
        data["object_mask"] = masks
        ds = datasets.Dataset.from_dict(data, features=feats)
    else:
        ds = datasets.Dataset.from_dict(data)
    ds = stamp_origin(ds, spec="easy-vqa", split=split, qtypes=sorted(qtypes) if qtypes is not None else None)
    return keep_answer_vocabulary(ds, easy_vqa.get_answers())  # the answers of both splits


_IMAGE_COLS = ("image", "image_path", "img", "file_name")
_ANSWER_COLS = ("answers", "answer", "label")


IMAGE_PLACEHOLDERS = ("<image>", "<|image_pad|>", "<start_of_image>", "<|vision_start|>", "<IMG_CONTEXT>")


def check_question(question, where: str = "") -> str:
    """A question is text without the processor's image placeholder (the prompt places the image)."""
    if not isinstance(question, str) or not question.strip():
        raise HeadsteerError(f"{where}question must be non-empty text; got {question!r}")
    tag = next((t for t in IMAGE_PLACEHOLDERS if t in question), None)
    if tag is not None:
        raise HeadsteerError(f"{where}question {question[:60]!r} contains the image placeholder {tag}: remove it, the "
                             "prompt template places the image")
    return question


def _read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            with open(path, encoding="utf-8") as f:
                try:
                    data = json.load(f)
                except ValueError as e:
                    raise HeadsteerError(f"{path} is not valid JSON ({e}): fix the file") from None
            rows = data if isinstance(data, list) else data.get("data", data.get("questions")) if isinstance(data, dict) else None
            if not isinstance(rows, list):
                raise HeadsteerError(f"{path}: expected a JSON list of examples (or an object with a \"data\" list)")
            return rows
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise HeadsteerError(f"{path}:{i}: not a JSON object ({e}): fix that line") from None
            return rows
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            return list(datasets.Dataset.from_parquet(str(path)))
    except UnicodeDecodeError as e:
        raise HeadsteerError(f"{path} is not UTF-8 text ({e.reason}): save it as UTF-8") from None
    except IsADirectoryError:
        raise HeadsteerError(f"{path} is a folder, not a data file") from None
    raise HeadsteerError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


def _find_table(folder: Path) -> Path:
    for name in ("data", "questions", "metadata", "annotations"):
        for ext in (".jsonl", ".json", ".csv", ".parquet"):
            if (folder / f"{name}{ext}").exists():
                return folder / f"{name}{ext}"
    raise HeadsteerError(f"{folder}: no data.jsonl/questions.jsonl/metadata.csv (or .json/.parquet) found in the folder")


def _open_image(value, root: Path) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    if isinstance(value, dict):
        value = value.get("path")
    p = Path(str(value))
    if not p.is_absolute():
        p = root / p
    if not p.exists():
        raise HeadsteerError(f"image not found: {p} (paths in the data file are relative to {root})")
    try:
        return Image.open(p).convert("RGB")
    except Exception as e:
        raise HeadsteerError(f"cannot read image {p}: {e.__class__.__name__}: {e}") from None


def load_local_vqa(path: str | os.PathLike, limit: int | None = None):
    """A user's VQA data from a JSONL/JSON/CSV/parquet file, or a folder holding one with the images.

    Needs columns ``image`` (path relative to the file, or image bytes), ``question`` and
    ``answer`` or ``answers`` (a list, or ``|``-separated in CSV); optional ``qtype``, and optional
    ``box``: the object's box ``[x0, y0, x1, y1]`` in image pixels (or ``"x0,y0,x1,y1"``), which
    ``headsteer flow`` uses to split the image tokens into object and background patches.
    """
    path = Path(path)
    if not path.exists():
        raise HeadsteerError(f"data not found: {path}")
    table = _find_table(path) if path.is_dir() else path
    rows = _read_table(table)
    if not rows:
        raise HeadsteerError(f"{table}: no examples")
    if not isinstance(rows[0], dict):
        raise HeadsteerError(f"{table}: expected one object per example with image, question and answer; got {str(rows[0])[:60]!r}")
    cols = set(rows[0])
    img_col = next((c for c in _IMAGE_COLS if c in cols), None)
    ans_col = next((c for c in _ANSWER_COLS if c in cols), None)
    missing = [n for n, c in (("image", img_col), ("question", "question" if "question" in cols else None), ("answer", ans_col)) if c is None]
    if missing:
        raise HeadsteerError(f"{table}: missing column(s) {', '.join(missing)}; found {sorted(cols)}")
    # closed-mode candidates: the answers of the whole file, before --limit (or --qtype) cut it; a row
    # past the limit that does not parse is never evaluated, and its answer is left out
    vocabulary = {_answers_of(r, ans_col, "")[1] for r in rows if _parses(r, ans_col)}
    if limit is not None:
        rows = rows[:limit]
    out = {"image": [], "question": [], "answer": [], "answers": [], "qtype": []}
    has_box = "box" in cols
    if has_box:
        out["object_box"] = []
    for i, r in enumerate(rows, 1):
        where = f"{table}: example {i}: "
        if not isinstance(r, dict):
            raise HeadsteerError(f"{where}expected an object with image, question and answer; got {str(r)[:60]!r}")
        gone = [c for c in (img_col, "question", ans_col) if r.get(c) in (None, "")]
        if gone:
            raise HeadsteerError(f"{where}missing {', '.join(gone)} (every example needs image, question and answer); fix "
                                 "that example")
        check_question(r["question"], where)
        answers, answer = _answers_of(r, ans_col, where)
        out["image"].append(_open_image(r[img_col], table.parent))
        out["question"].append(str(r["question"]))
        out["answers"].append(answers)
        out["answer"].append(answer)
        out["qtype"].append(str(r.get("qtype") or r.get("question_type") or "all"))
        if has_box:
            if r.get("box") is None:
                raise HeadsteerError(f"{where}missing box (the first example has one, so every example needs one)")
            out["object_box"].append(_box(r["box"], out["image"][-1].size, table))
    extra = {"object_box": datasets.Sequence(datasets.Value("float32"))} if has_box else {}
    ds = datasets.Dataset.from_dict(out, features=vqa_features(**extra))
    ds = stamp_origin(ds, spec=str(path.resolve()), split=None, qtypes=None,
                      file_sha256=hashlib.sha256(table.read_bytes()).hexdigest())
    return keep_answer_vocabulary(ds, vocabulary)


def _answers_of(row: dict, col: str, where: str) -> tuple[list[str], str]:
    """(reference answers, the answer: the most frequent reference) of one example."""
    answers = row[col]
    if isinstance(answers, (int, float)) and not isinstance(answers, bool):
        answers = str(answers)
    if not isinstance(answers, (str, list)) or not answers:
        raise HeadsteerError(f"{where}{col} must be text or a non-empty list of texts; got {answers!r}")
    if isinstance(answers, str):
        answers = [a.strip() for a in answers.split("|")] if col == "answers" else [answers]
    answers = [str(a) for a in answers]
    return answers, max(answers, key=answers.count)  # ties: the first listed (not hash order)


def _parses(row, col: str) -> bool:
    try:
        _answers_of(row, col, "")
    except (HeadsteerError, TypeError, KeyError, AttributeError):
        return False
    return True


def _box(value, size, table) -> list[float]:
    """[x0, y0, x1, y1, W, H]: the box with the image size it is measured in."""
    try:
        b = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        b = []
    W, H = size
    if len(b) != 4 or not (0 <= b[0] < b[2] <= W and 0 <= b[1] < b[3] <= H):
        raise HeadsteerError(f"{table}: box {value!r} is not x0,y0,x1,y1 inside a {W}x{H} image")
    return b + [float(W), float(H)]


def load_data(spec: str | None, split: str = "test", limit: int | None = None, qtypes=None):
    """``easy-vqa`` (default) / ``easy-vqa:train`` or a local path."""
    if spec in (None, "", "easy-vqa", "easyvqa"):
        return load_easy_vqa(split, limit=limit, qtypes=qtypes)
    if spec.startswith("easy-vqa:"):
        return load_easy_vqa(spec.split(":", 1)[1], limit=limit, qtypes=qtypes)
    ds = load_local_vqa(spec, limit=limit)
    if qtypes is not None:
        origin = data_origin(ds)
        ds = stamp_origin(ds.filter(lambda r: r["qtype"] in qtypes), **{**origin, "qtypes": sorted(qtypes)})
    return ds


_STAMP = "headsteer-data "


def _stamp(dataset) -> dict | None:
    desc = getattr(getattr(dataset, "info", None), "description", None) or ""
    if not desc.startswith(_STAMP):
        return None
    try:
        return json.loads(desc[len(_STAMP):])
    except json.JSONDecodeError:
        return None


def _write_stamp(dataset, **fields):
    dataset.info.description = _STAMP + json.dumps({**(_stamp(dataset) or {}), **fields})
    return dataset


def stamp_origin(dataset, **origin):
    """Record where ``dataset`` came from (spec, split, question types, ...) in its
    ``info.description``, with the ``datasets`` fingerprint it had then: every transform (map,
    filter, select) gives a new fingerprint, so a transformed data set is not taken for its origin."""
    return _write_stamp(dataset, origin=origin, fingerprint=dataset._fingerprint)


def keep_answer_vocabulary(dataset, answers):
    """Keep the answer vocabulary of the whole data set (every answer of the split or file, before a
    limit or a question-type filter cut it) with ``dataset``: ``datasets`` copies ``info`` into
    what select, filter and map return, so the vocabulary follows the rows a run takes."""
    return _write_stamp(dataset, answers=sorted(set(answers)))


def answer_vocabulary(dataset) -> list[str]:
    """The candidates of closed-vocabulary scoring: the vocabulary the loader kept, else (a data set
    made elsewhere) the answers of all its rows. Never the answers of the rows a run evaluates only,
    which would make a question's prediction depend on the other questions of the run."""
    kept = (_stamp(dataset) or {}).get("answers")
    return list(kept) if kept else sorted(set(dataset["answer"]))


def data_origin(dataset, exact: bool = True) -> dict | None:
    """The origin :func:`stamp_origin` recorded, or None. ``exact=False`` also answers for a data
    set transformed since (its split is still known, its rows may not be the origin's)."""
    d = _stamp(dataset)
    if d is None:
        return None
    if exact and d.get("fingerprint") != getattr(dataset, "_fingerprint", None):
        return None
    return d.get("origin")
