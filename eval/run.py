"""Evaluate a model (optionally under an edit) on a VQA data set: per-example rows written as they
finish (a rerun resumes), data-parallel over processes under ``accelerate launch``."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging

import numpy as np

from headsteer.baseline import as_baseline
from headsteer.data import answer_vocabulary
from headsteer.errors import HeadsteerError
from headsteer.fingerprint import rows_fingerprint
from headsteer.parallel import finish_processes, gather_rows, process_shard  # noqa: F401  (were defined here)
from headsteer.rows import resume_rows
from headsteer.rundir import open_run, record, run_identity
from headsteer.selfcheck import SKIPPED, check_example

from .accuracy import bootstrap_ci, predict_closed, predict_open, soft_accuracy, summarize
from .transfer import transfer_batch

METRICS = ("accuracy", "transfer")
OUTPUTS = ("per_example.jsonl", "summary.json", "summary.md")  # what ``headsteer eval`` writes (the only files --force deletes)


log = logging.getLogger("headsteer")


def candidate_answers(dataset, answers=None) -> list[str]:
    """Closed-mode candidates: ``answers`` (e.g. ``--answers FILE``) or the data set's whole answer
    vocabulary (``headsteer.data.answer_vocabulary``) — never only the gold answers of the rows being
    evaluated, so that a question's prediction does not depend on which others are in the run."""
    if answers is None:
        return answer_vocabulary(dataset)
    out = sorted({str(a).strip() for a in answers} - {""})
    if not out:
        raise HeadsteerError("no candidate answers: give at least one answer (one per line in --answers)")
    return out


def candidates_identity(candidates: list[str]) -> dict:
    """Size and content hash of a candidate list, for the identity (the list itself goes to run.json's
    ``candidates``, beside it: thousands of VQAv2 answers would swamp the identity and the log)."""
    return {"n": len(candidates), "sha256": hashlib.sha256("\n".join(candidates).encode()).hexdigest()}


def outputs(world: int) -> list[str]:
    return [*OUTPUTS, *(f"per_example.rank{r}.jsonl" for r in range(world) if world > 1)]


def eval_identity(model, processor, dataset, n, metrics, edit, mode, baseline, top_heads, data_spec=None, candidates=None):
    """(identity, info) of an evaluation: what its rows depend on (``headsteer.rundir``). ``candidates``:
    the closed-mode answers (default: the data set's vocabulary)."""
    if mode == "closed" and candidates is None:
        candidates = candidate_answers(dataset)
    settings = {"metrics": sorted(metrics), "mode": mode,
                "candidates": candidates_identity(candidates) if mode == "closed" else None}
    if "transfer" in metrics:
        settings["top_heads"] = str(top_heads) if top_heads is not None else None
        if isinstance(baseline, str) and baseline == "mean" and "image" in dataset.column_names:
            # a mean baseline is built from the data's first images (see headsteer.baseline.as_baseline)
            settings["baseline_reference_rows"] = rows_fingerprint(dataset.select_columns(["image"]), 256)
    base = (baseline.describe() if hasattr(baseline, "describe") else baseline) if "transfer" in metrics else None
    return run_identity("eval", model, processor, dataset, n, data_spec, settings, edit=edit, baseline=base)


def _edit_context(model, checked):
    """The edit applied, from what ``check_edit`` returned (None: no edit)."""
    if checked is None:
        return contextlib.nullcontext()
    from headsteer.edit.apply import applied_checked

    return applied_checked(model, *checked)


def self_check(model, processor, example: dict, checked=None, generates: bool = False) -> dict:
    """The run's engine check on its first example (``headsteer.selfcheck``): identity, and where the
    run generates under an edit (``checked``: what ``check_edit`` returned), cached decoding == full
    forwards under it. Stops the run (one line) on a failure."""
    context = (lambda: _edit_context(model, checked)) if generates and checked is not None else None
    return check_example(model, processor, example, generation_context=context)


def evaluate(model, processor, dataset, metrics=("accuracy",), edit=None, batch_size: int = 16, mode: str = "closed",
             baseline="mean", top_heads=None, out_dir=None, progress=None, limit: int | None = None, force: bool = False,
             data_spec: dict | None = None, check: bool = True, answers: list[str] | None = None) -> list[dict]:
    """Per-example rows (index, qtype, prediction, correct/score, transfer metrics). Closed mode picks
    the most likely of ``answers`` (default: the data set's whole answer vocabulary, whatever ``limit``
    keeps: ``candidate_answers``); open mode generates. With ``out_dir``
    rows are appended there as they finish and a rerun of the same identity (model, processor, data
    rows, edit, metrics ...: ``headsteer.rundir``) resumes; a folder of another identity is refused
    unless ``force``. ``data_spec``: what else identifies the data (kept in run.json). ``check``: the
    engine's self-check on the first example before the main work (False: skipped, --no-self-check);
    its figures go to run.json."""
    bad = set(metrics) - set(METRICS)
    if bad:
        raise HeadsteerError(f"unknown metric(s) {', '.join(sorted(bad))}: use {', '.join(METRICS)}")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if answers is not None and mode != "closed":
        raise HeadsteerError("candidate answers (--answers) are for closed mode: drop them or use --mode closed")
    candidates = candidate_answers(dataset, answers) if mode == "closed" else None
    if candidates is not None and n:
        # a gold answer that is no candidate can never be predicted: say so rather than score it silently
        outside = sorted(set(dataset.select(range(n))["answer"]) - set(candidates))
        if outside:
            log.warning(f"{len(outside)} gold answer(s) are not among the {len(candidates)} candidate answers and can never "
                        f"be predicted in closed mode (e.g. {outside[0]!r})")
    checked = None
    if edit is not None:
        from headsteer.edit.apply import check_edit

        checked = check_edit(model, edit, processor)  # refused before any run folder is written; checked once
    rank, world = process_shard()
    mine = list(range(rank, n, world))
    done = {}
    path = None
    engine = dict(SKIPPED)
    if check and n:
        engine = self_check(model, processor, dataset[0], checked, generates=mode == "open" and "accuracy" in metrics)
    if out_dir is not None:
        ident, info = eval_identity(model, processor, dataset, n, metrics, edit, mode, baseline, top_heads, data_spec,
                                    candidates)
        run = open_run(out_dir, ident, force=force, outputs=outputs(world), info=info)
        record(run, "self_check", engine)
        record(run, "candidates", candidates)
        path = run / (f"per_example.rank{rank}.jsonl" if world > 1 else "per_example.jsonl")
        done = resume_rows(path)
    todo = [i for i in mine if i not in done]
    f = open(path, "a") if path is not None else None
    try:
        with _edit_context(model, checked):
            # built under the edit: an edited model ablates towards its own baseline K/V (the mean
            # baseline's disk cache is bypassed while a hook edit is active: headsteer.baseline)
            base = as_baseline(model, processor, baseline, dataset) if "transfer" in metrics and todo else None
            for s in range(0, len(todo), batch_size):
                idx = todo[s : s + batch_size]
                ex = [dataset[i] for i in idx]
                ims, qs = [e["image"] for e in ex], [e["question"] for e in ex]
                rows = [{"index": i, "qtype": e.get("qtype"), "answer": e["answer"]} for i, e in zip(idx, ex)]
                if "accuracy" in metrics:
                    if mode == "closed":
                        preds, _ = predict_closed(model, processor, ims, qs, candidates)
                    else:
                        preds = predict_open(model, processor, ims, qs)
                    for r, p, e in zip(rows, preds, ex):
                        r["prediction"] = p
                        r["correct"] = soft_accuracy(p, e.get("answers") or [e["answer"]])
                if "transfer" in metrics:
                    tr = transfer_batch(model, processor, ims, qs, [e["answer"] for e in ex], base, top_heads, candidates)
                    for r, t in zip(rows, tr):
                        r.update(t)
                for r in rows:
                    done[r["index"]] = r
                    if f is not None:
                        f.write(json.dumps(r) + "\n")
                if f is not None:
                    f.flush()
                if progress is not None:
                    progress(len(idx))
    finally:
        if f is not None:
            f.close()
    return gather_rows([done[i] for i in mine])


def summary(rows: list[dict]) -> dict:
    """Accuracy (overall, per type, CIs) and the mean transfer metrics."""
    out = {"n": len(rows)}
    if rows and "correct" in rows[0]:
        out["accuracy"] = summarize(rows, "correct")
    if rows and "image_reliance" in rows[0]:
        out["image_reliance"] = float(np.mean([r["image_reliance"] for r in rows]))
        out["accuracy_blank_image"] = float(np.mean([r["correct_blank"] for r in rows]))
        out["accuracy_no_image_flow"] = float(np.mean([r["correct_no_image_flow"] for r in rows]))
        out["attn_to_image_per_layer"] = np.mean([r["attn_to_image"] for r in rows], axis=0).tolist()
        if "topk_recovered" in rows[0]:
            # mean share of the image reliance that the top-k heads recover alone, over the examples
            # where it is defined (image reliance not ~0), with a bootstrap CI
            vals = [r["topk_recovered"] for r in rows if r["topk_recovered"] == r["topk_recovered"]]
            out["topk_recovered_mean"] = float(np.mean(vals)) if vals else float("nan")
            out["topk_recovered_ci"] = list(bootstrap_ci(vals))
            out["topk_recovered_n"] = len(vals)
    return out
