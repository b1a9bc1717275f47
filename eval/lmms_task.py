"""Any ``--data`` source as local files plus an lmms-eval task folder (``headsteer export-task``).

What is written under ``out``::

    data.jsonl          one row per question: index, image (a path relative to out), question,
                        answer, answers (the reference answers), qtype
    images/<sha>.png    each distinct image once, lossless (the pixels headsteer eval reads)
    tasks/<name>.yaml   the lmms-eval task: local JSON data (``dataset_path: json`` with an absolute
                        ``data_files`` path, so nothing is fetched from a hub), open generation
    tasks/utils.py      doc_to_visual / doc_to_text / doc_to_target / process_results, standalone
                        (no headsteer import): VQA accuracy after the official VQAv2 normalisation,
                        copied at export time from ``headsteer/eval/vqa_answers.py`` — exact match
                        with one reference answer, soft accuracy with several — overall and per
                        question type
    run.json headsteer.log   the folder's identity (``headsteer.rundir``), as for every run folder

``doc_to_text`` is the bare question: the model's chat template places the image and the role
tags, as ``headsteer eval`` does. Run it with ``python -m lmms_eval --include_path OUT/tasks --tasks NAME``.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import re
from pathlib import Path

from headsteer.errors import HeadsteerError
from headsteer.files import write_bytes, write_text

from . import vqa_answers

DATA_FILE = "data.jsonl"
IMAGES = "images"
TASKS = "tasks"
UTILS = "utils.py"
DEFAULT_MAX_NEW_TOKENS = 16


def task_name_for(out) -> str:
    """The default task name: ``headsteer_`` + the output folder's name, as an identifier."""
    return "headsteer_" + (re.sub(r"[^A-Za-z0-9]+", "_", Path(out).resolve().name).strip("_").lower() or "vqa")


def check_task_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name or ""):
        raise HeadsteerError(f"--name {name!r}: an lmms-eval task name here is letters, digits and _, not starting with "
                             "a digit (e.g. headsteer_easyvqa)")
    return name


def qtype_metrics(qtypes) -> dict[str, str]:
    """Question type -> its metric name (``accuracy_<type>``, with anything but letters and digits
    as ``_``: ``yes/no`` -> ``accuracy_yes_no``); two types that would share a name get ``_2``, ``_3``.
    ``all`` (data without question types) has no metric of its own: ``accuracy`` is it."""
    out: dict[str, str] = {}
    for t in sorted(set(qtypes) - {"all"}):
        base = "accuracy_" + (re.sub(r"[^A-Za-z0-9]+", "_", t).strip("_").lower() or "type")
        name, k = base, 2
        while name in out.values() or name == "accuracy":
            name, k = f"{base}_{k}", k + 1
        out[t] = name
    return out


def scoring_source() -> str:
    """``eval/vqa_answers.py`` without its docstring and ``__future__`` import, to paste into a
    standalone file: the very code ``headsteer eval`` scores with."""
    src = Path(vqa_answers.__file__).read_text(encoding="utf-8")
    tree = ast.parse(src)
    lines = src.splitlines(keepends=True)
    drop = set()
    for node in tree.body:
        is_doc = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        is_future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
        if (is_doc and node is tree.body[0]) or is_future:
            drop.update(range(node.lineno - 1, node.end_lineno))
    return "".join(line for i, line in enumerate(lines) if i not in drop).strip() + "\n"


_UTILS_HEAD = '''"""lmms-eval task functions written by `headsteer export-task` (headsteer {version}); standalone:
nothing here imports headsteer.

Scoring: ``vqa_accuracy`` below after the official VQAv2 answer normalisation — exact match of
the normalised answers with one reference answer, VQA soft accuracy (min(1, matches / 3) over the
leave-one-out subsets) with several — reported overall as ``accuracy`` and per question type as
``accuracy_<type>``, the figures ``headsteer eval --mode open`` reports."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

# the export folder: data.jsonl and images/ (paths in data.jsonl are relative to it)
DATA_DIR = Path(__file__).resolve().parent.parent
# question type -> the name of its metric
QTYPE_METRICS = {qtype_metrics}


def doc_to_visual(doc):
    """The question's image (a lossless PNG of the pixels headsteer eval reads)."""
    return [Image.open(DATA_DIR / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The bare question: the model's chat template adds the image and the prompt (as in headsteer
    eval). ``pre_prompt``/``post_prompt`` in the YAML's lmms_eval_specific_kwargs are added if set."""
    kw = lmms_eval_specific_kwargs or {{}}
    return f"{{kw.get('pre_prompt', '')}}{{doc['question']}}{{kw.get('post_prompt', '')}}"


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    """VQA accuracy of the generated answer against the reference answers: ``accuracy`` and the
    metric of the question's type."""
    pred = results[0]
    pred = getattr(pred, "text", pred)  # a generation result object or plain text
    pred = "" if pred is None else str(pred)
    score = vqa_accuracy(pred, doc["answers"] or [doc["answer"]])
    out = {{"accuracy": score}}
    if doc["qtype"] in QTYPE_METRICS:
        out[QTYPE_METRICS[doc["qtype"]]] = score
    return out


# ---------------------------------------------------------------------------------------------
# Copied verbatim from headsteer/eval/vqa_answers.py (headsteer {version}) at export time, so the
# task folder needs no headsteer; edit that file, not this copy, and export again.
# ---------------------------------------------------------------------------------------------
'''


def utils_source(qtypes) -> str:
    import headsteer

    metrics = json.dumps(qtype_metrics(qtypes), indent=4, ensure_ascii=False)  # a JSON object of strings is a Python dict
    return _UTILS_HEAD.format(version=headsteer.__version__, qtype_metrics=metrics) + "\n" + scoring_source()


def _q(text) -> str:
    """A YAML scalar (JSON strings are valid YAML)."""
    return json.dumps(str(text), ensure_ascii=False)


def task_yaml(name: str, data_file: Path, qtypes, max_new_tokens: int, description: str) -> str:
    metrics = ["accuracy", *qtype_metrics(qtypes).values()]
    lines = [
        f"# lmms-eval task written by `headsteer export-task`: {description}",
        "# Local files only: the questions are the JSON lines below (absolute path: export again after moving",
        "# the folder), the images sit beside them. Run: python -m lmms_eval --include_path <this folder> --tasks " + name,
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {_q(data_file)}",
        "test_split: test",
        "output_type: generate_until",
        "doc_to_visual: !function utils.doc_to_visual",
        "doc_to_text: !function utils.doc_to_text",
        "doc_to_target: !function utils.doc_to_target",
        "process_results: !function utils.process_results",
        "generation_kwargs:",
        f"  max_new_tokens: {int(max_new_tokens)}",
        "  temperature: 0",
        "  do_sample: false",
        "  num_beams: 1",
        "lmms_eval_specific_kwargs:",
        "  default:",
        '    pre_prompt: ""',
        '    post_prompt: ""',
        "metric_list:",
    ]
    for m in metrics:
        lines += [f"  - metric: {m}", "    aggregation: mean", "    higher_is_better: true"]
    lines += ["metadata:", "  version: 0.0"]
    return "\n".join(lines) + "\n"


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def export_task(dataset, out, name: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                description: str = "", force: bool = False, data_spec: dict | None = None) -> dict:
    """Write ``dataset`` (rows with image, question, answer, answers, qtype) and an lmms-eval task
    for it under ``out``. The folder is a headsteer run folder: a rerun with the same rows and
    settings rewrites it, other contents are refused unless ``force`` (which deletes only what the
    earlier export wrote). Returns a summary (task name, paths, counts)."""
    from headsteer.rundir import check_out, open_run, record, run_identity

    out = Path(out)
    name = check_task_name(name or task_name_for(out))
    if int(max_new_tokens) < 1:
        raise HeadsteerError(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
    check_out(out)
    n = len(dataset)
    if n == 0:
        raise HeadsteerError("no questions to export: choose data, question types or --limit that select some")
    missing = [c for c in ("image", "question", "answer") if c not in dataset.column_names]
    if missing:
        raise HeadsteerError(f"the data has no {', '.join(missing)} column: export-task needs image, question and answer")
    rows, images = [], {}
    for i in range(n):
        ex = dataset[i]
        png = _png(ex["image"])
        rel = f"{IMAGES}/{hashlib.sha256(png).hexdigest()[:20]}.png"
        images.setdefault(rel, png)
        answers = [str(a) for a in (ex.get("answers") or [ex["answer"]])]
        rows.append({"index": i, "image": rel, "question": ex["question"], "answer": str(ex["answer"]),
                     "answers": answers, "qtype": str(ex.get("qtype") or "all")})
    qtypes = sorted({r["qtype"] for r in rows})
    yaml_name = f"{TASKS}/{name}.yaml"
    outputs = [DATA_FILE, *sorted(images), f"{TASKS}/{UTILS}", yaml_name]
    settings = {"task_name": name, "max_new_tokens": int(max_new_tokens), "format": "headsteer-lmms-task-1"}
    ident, info = run_identity("export-task", dataset=dataset, n=n, data_spec=data_spec, settings=settings)
    run = open_run(out, ident, force=force, outputs=outputs, info=info)
    for rel, png in images.items():
        write_bytes(out / rel, png)
    write_text(out / DATA_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_text(out / TASKS / UTILS, utils_source(qtypes))
    write_text(out / yaml_name, task_yaml(name, (out / DATA_FILE).resolve(), qtypes, max_new_tokens, description))
    summary = {"task": name, "n": n, "images": len(images), "qtypes": {t: sum(r["qtype"] == t for r in rows) for t in qtypes},
               "metrics": ["accuracy", *qtype_metrics(qtypes).values()], "include_path": str((out / TASKS).resolve()),
               "data_file": str((out / DATA_FILE).resolve()), "max_new_tokens": int(max_new_tokens)}
    record(run, "export", summary)
    return summary


def export_outputs() -> list[str]:
    """What the Commands table lists for export-task (the fixed names)."""
    return [DATA_FILE, f"{IMAGES}/", f"{TASKS}/NAME.yaml", f"{TASKS}/{UTILS}"]



# --- reading lmms-eval's output back (scripts/lmms_eval_check.sh) ---------------------------------

def _text(resp) -> str:
    """A logged response as text: lmms-eval logs a string, a one-element list, or a result object."""
    while isinstance(resp, list) and resp:
        resp = resp[0]
    if isinstance(resp, dict):
        resp = resp.get("text", "")
    return "" if resp is None or resp == [] else str(resp)


def read_lmms_samples(path) -> dict[int, dict]:
    """doc_id -> {prediction, accuracy, input} from an lmms-eval ``--log_samples`` JSONL file."""
    out = {}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        s = json.loads(line)
        if "doc_id" not in s or "accuracy" not in s:
            raise HeadsteerError(f"{path}:{i}: not a sample of a headsteer export-task (no doc_id/accuracy)")
        out[int(s["doc_id"])] = {"prediction": _text(s.get("filtered_resps", s.get("resps"))), "accuracy": float(s["accuracy"]),
                                 "input": s.get("input")}
    return out


def agreement(rows: list[dict], lmms: dict[int, dict], eval_rows: list[dict]) -> dict:
    """Per-question agreement of lmms-eval's answers with ``headsteer eval``'s on the exported
    ``rows``: same answer text (stripped), same score, and headsteer's answer as the first words of
    lmms-eval's (a diagnostic for a model that does not stop). Also both accuracies overall and per
    question type, and lmms-eval's logged score checked against ``vqa_answers.vqa_accuracy`` of its
    own answer."""
    from .vqa_answers import vqa_accuracy

    by_index = {int(r["index"]): r for r in eval_rows}
    n = len(rows)
    same_answer = same_score = prefix = rescored = 0
    missing, mismatched_question, differ = [], [], []
    acc = {"lmms-eval": {}, "headsteer": {}}
    for row in rows:
        i = row["index"]
        lm, hs = lmms.get(i), by_index.get(i)
        if lm is None or hs is None:
            missing.append(i)
            continue
        if lm.get("input") is not None and lm["input"] != row["question"]:
            mismatched_question.append(i)
        a, b = lm["prediction"].strip(), str(hs.get("prediction", "")).strip()
        same_answer += a == b
        same_score += lm["accuracy"] == float(hs["correct"])
        prefix += bool(b) and a.split()[: len(b.split())] == b.split()
        rescored += abs(vqa_accuracy(lm["prediction"], row["answers"]) - lm["accuracy"]) < 1e-9
        if a != b and len(differ) < 10:
            differ.append({"index": i, "question": row["question"], "answer": row["answer"], "lmms-eval": a, "headsteer": b})
        for side, score in (("lmms-eval", lm["accuracy"]), ("headsteer", float(hs["correct"]))):
            for key in ("all", row["qtype"]):
                acc[side].setdefault(key, []).append(score)
    compared = n - len(missing)
    mean = {side: {k: sum(v) / len(v) for k, v in d.items()} for side, d in acc.items()}
    return {"n": n, "compared": compared, "missing": missing[:20], "n_missing": len(missing),
            "question_mismatch": mismatched_question[:20], "same_answer": same_answer, "same_score": same_score,
            "headsteer_answer_is_prefix": prefix, "lmms_score_rechecked": rescored, "accuracy": mean, "differ": differ}
