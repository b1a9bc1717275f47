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
import math
import os
from pathlib import Path

import datasets
import easy_vqa
import numpy as np
from PIL import Image

from .errors import HeadsteerError
from .images import open_image
from .paths import input_file, read_bytes, read_text
from .questions import IMAGE_PLACEHOLDERS, check_question  # noqa: F401  (public here too)

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
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _json_error(path, e: json.JSONDecodeError, line_offset: int = 0) -> HeadsteerError:
    return HeadsteerError(f"{path}:{e.lineno + line_offset}: not valid JSON ({e.msg}, column {e.colno}): fix that line")


def json_lines(text: str, path) -> list:
    """One JSON value per non-blank line; a broken line is named by its number."""
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise _json_error(path, e, i - 1) from None
    return rows


def read_rows(path, what: str = "data file") -> list:
    """The rows of a JSONL/JSON/CSV/parquet file, as read (the caller checks each row). Text files are
    UTF-8 (a byte-order mark, Excel's default for CSV, is dropped); a broken JSON line is named by its
    number; a parquet column of raw bytes stays bytes (an image, not a path)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise HeadsteerError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    input_file(path, what)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's ArrowInvalid & co: not a parquet file
            raise HeadsteerError(f"{path} is not a readable parquet file ({type(e).__name__}: {str(e)[:120]})") from None
    text = read_text(path, what)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise _json_error(path, e) from None
        rows = data if isinstance(data, list) else data.get("data", data.get("questions")) if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise HeadsteerError(f"{path}: expected a JSON list of examples (or an object with a \"data\" list)")
        return rows
    if suffix == ".jsonl":
        return json_lines(text, path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for r in reader:
            if None in r:  # DictReader keeps a row's surplus fields under the key None
                raise HeadsteerError(f"{path}:{reader.line_num}: more fields than the header has columns: quote fields "
                                     "that hold commas")
            rows.append(r)
    except csv.Error as e:
        raise HeadsteerError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    return rows


def _find_table(folder: Path) -> Path:
    for name in ("data", "questions", "metadata", "annotations"):
        for ext in DATA_SUFFIXES:
            if (folder / f"{name}{ext}").exists():
                return folder / f"{name}{ext}"
    raise HeadsteerError(f"{folder}: no data.jsonl/questions.jsonl/metadata.csv (or .json/.parquet) found in the folder")


def _open_image(value, root: Path) -> Image.Image:
    """An example's image: a path relative to the data file's folder, bytes or a record (``headsteer.images``)."""
    return open_image(value, root)


def _text_answer(a, where: str, col: str) -> str:
    if isinstance(a, dict) and "answer" in a:  # VQAv2 annotations: {"answer": ..., "answer_confidence": ...}
        a = a["answer"]
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        if not math.isfinite(a):
            raise HeadsteerError(f"{where}{col} holds {a!r}, not an answer")
        a = str(a)
    if not isinstance(a, str) or not a.strip():
        raise HeadsteerError(f"{where}{col} must be text or a non-empty list of texts; got {str(a)[:60]!r}")
    return a.strip()


def answers_of(value, where: str, col: str) -> list[str]:
    """A row's reference answers: text (``|``-separated in an ``answers`` column), a number, or a list
    of texts, numbers or ``{"answer": ...}`` records."""
    if isinstance(value, str) and col == "answers":
        value = value.split("|")
    if isinstance(value, (list, tuple)):
        if not value:
            raise HeadsteerError(f"{where}{col} is an empty list: give at least one answer")
        return [_text_answer(a, where, col) for a in value]
    return [_text_answer(value, where, col)]


def _qtype_of(r: dict, where: str) -> str:
    q = r.get("qtype", r.get("question_type"))
    if q is None or q == "":
        return "all"
    if isinstance(q, bool) or not isinstance(q, (str, int)):
        raise HeadsteerError(f"{where}qtype must be text; got {str(q)[:60]!r}")
    return str(q)


def load_local_vqa(path: str | os.PathLike, limit: int | None = None, qtypes=None):
    """A user's VQA data from a JSONL/JSON/CSV/parquet file, or a folder holding one with the images.

    Needs columns ``image`` (path relative to the file, image bytes, or a ``{"bytes", "path"}``
    record), ``question`` and ``answer`` or ``answers`` (a list, or ``|``-separated in CSV); optional
    ``qtype``, and optional ``box``: the object's box ``[x0, y0, x1, y1]`` in image pixels (or
    ``"x0,y0,x1,y1"``), which ``headsteer flow`` uses to split the image tokens into object and
    background patches. Every row is checked against this format (a one-line error names the row);
    ``qtypes`` keeps the examples of those question types, and ``limit`` the first N of them.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise HeadsteerError(f"data not found: {path}")
    table = _find_table(path) if path.is_dir() else path
    rows = read_rows(table)
    if not rows:
        raise HeadsteerError(f"{table}: no examples")
    if not isinstance(rows[0], dict):
        raise HeadsteerError(f"{table}: expected one object per example with image, question and answer; got {str(rows[0])[:60]!r}")
    cols = set(rows[0])
    img_col = next((c for c in _IMAGE_COLS if c in cols), None)
    ans_col = next((c for c in _ANSWER_COLS if c in cols), None)
    missing = [n for n, c in (("image", img_col), ("question", "question" if "question" in cols else None), ("answer", ans_col)) if c is None]
    if missing:
        raise HeadsteerError(f"{table}: missing column(s) {', '.join(missing)}; found {sorted(map(str, cols))}")
    keep = None if qtypes is None else set(qtypes)
    # closed-mode candidates: the answers of the whole file, before --limit or --qtype cut it (every row is
    # checked, so every row's answer counts)
    vocabulary = set()
    out = {"image": [], "question": [], "answer": [], "answers": [], "qtype": []}
    has_box = "box" in cols
    if has_box:
        out["object_box"] = []
    for i, r in enumerate(rows, 1):
        # every row is checked, also those the filter or the limit leave out; only kept rows' images are read
        where = f"{table}: example {i}: "
        if not isinstance(r, dict):
            raise HeadsteerError(f"{where}expected an object with image, question and answer; got {str(r)[:60]!r}")
        gone = [c for c in (img_col, "question", ans_col) if r.get(c) is None or r.get(c) == ""]
        if gone:
            raise HeadsteerError(f"{where}missing {', '.join(gone)} (every example needs image, question and answer); fix "
                                 "that example")
        check_question(r["question"], where)
        answers = answers_of(r[ans_col], where, ans_col)
        qtype = _qtype_of(r, where)
        if has_box and r.get("box") is None:
            raise HeadsteerError(f"{where}missing box (the first example has one, so every example needs one)")
        vocabulary.add(max(answers, key=answers.count))
        if (keep is not None and qtype not in keep) or (limit is not None and len(out["image"]) >= limit):
            continue
        out["image"].append(open_image(r[img_col], table.parent, name=f"{where}image"))
        out["question"].append(r["question"])
        out["answers"].append(answers)
        out["answer"].append(max(answers, key=answers.count))  # ties: the first listed (not hash order)
        out["qtype"].append(qtype)
        if has_box:
            out["object_box"].append(_box(r["box"], out["image"][-1].size, table))
    extra = {"object_box": datasets.Sequence(datasets.Value("float32"))} if has_box else {}
    ds = datasets.Dataset.from_dict(out, features=vqa_features(**extra))
    ds = stamp_origin(ds, spec=str(path.resolve()), split=None, qtypes=sorted(keep) if keep is not None else None,
                      file_sha256=hashlib.sha256(read_bytes(table, "data file")).hexdigest())
    return keep_answer_vocabulary(ds, vocabulary)


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
    """``easy-vqa`` (default) / ``easy-vqa:train`` or a local path; ``qtypes`` keeps those question
    types and ``limit`` the first N of them, whatever the source."""
    if spec in (None, "", "easy-vqa", "easyvqa"):
        return load_easy_vqa(split, limit=limit, qtypes=qtypes)
    if spec.startswith("easy-vqa:"):
        return load_easy_vqa(spec.split(":", 1)[1], limit=limit, qtypes=qtypes)
    return load_local_vqa(spec, limit=limit, qtypes=qtypes)


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
