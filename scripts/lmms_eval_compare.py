"""lmms-eval's answers against `headsteer eval --mode open`'s on the questions of one
`headsteer export-task` folder: both accuracies (overall and per question type) and the per-question
agreement, read from lmms-eval's --log_samples output and headsteer eval's per_example.jsonl.
Run by scripts/lmms_eval_check.sh; usable on its own:

    python scripts/lmms_eval_compare.py --task-dir TASK --lmms-out LMMS_OUT --eval-out EVAL_OUT [--json F]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _checkout  # noqa: F401  (refuses to run against another tree's headsteer)

from headsteer.eval.lmms_task import agreement, read_lmms_samples


def samples_file(lmms_out: Path, task: str | None) -> Path:
    found = sorted(lmms_out.rglob(f"*_samples_{task or '*'}.jsonl"))
    if len(found) != 1:
        sys.exit(f"error: expected one lmms-eval samples file (--log_samples) under {lmms_out}, found {len(found)}: "
                 "did lmms-eval finish? (it exits 0 after an error: read its log)")
    return found[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task-dir", required=True, type=Path, help="the `headsteer export-task --out` folder")
    ap.add_argument("--lmms-out", required=True, type=Path, help="lmms-eval's --output_path of one run")
    ap.add_argument("--eval-out", required=True, type=Path, help="`headsteer eval --out` folder on the same questions")
    ap.add_argument("--task", default=None, help="lmms-eval task name  [default: the only one in --lmms-out]")
    ap.add_argument("--label", default="", help="name of this comparison in the printout")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)

    rows = [json.loads(line) for line in (a.task_dir / "data.jsonl").read_text().splitlines() if line.strip()]
    samples = samples_file(a.lmms_out, a.task)
    task = a.task or samples.stem.split("_samples_", 1)[1]
    lmms = read_lmms_samples(samples)
    results = sorted(samples.parent.glob("*_results.json"))
    reported = json.loads(results[-1].read_text())["results"].get(task, {}) if results else {}
    eval_rows = [json.loads(line) for line in (a.eval_out / "per_example.jsonl").read_text().splitlines() if line.strip()]
    r = agreement(rows, lmms, eval_rows)
    r["lmms_reported"] = {k.split(",")[0]: v for k, v in reported.items() if k.startswith("accuracy") and "_stderr" not in k}
    n, c = r["n"], r["compared"]
    print(f"## {a.label or a.lmms_out.name}: {c} of {n} questions compared")
    types = list(r["accuracy"]["headsteer"])
    print("| accuracy | " + " | ".join(types) + " |")
    print("|---|" + "---|" * len(types))
    for side in ("lmms-eval", "headsteer"):
        print(f"| {side} | " + " | ".join(f"{r['accuracy'][side].get(t, float('nan')):.4f}" for t in types) + " |")
    print("lmms-eval's own table (results.json): " + ", ".join(f"{k} {v:.4f}" for k, v in r["lmms_reported"].items()))
    print(f"same answer text: {r['same_answer']}/{c}; same score: {r['same_score']}/{c}; headsteer's answer = the first "
          f"words of lmms-eval's: {r['headsteer_answer_is_prefix']}/{c}; lmms-eval's logged score = headsteer's "
          f"vqa_accuracy of its answer: {r['lmms_score_rechecked']}/{c}")
    if r["n_missing"] or r["question_mismatch"]:
        print(f"WARNING: {r['n_missing']} questions missing on one side (first: {r['missing']}); questions that differ "
              f"between the two: {r['question_mismatch']}")
    for d in r["differ"][:5]:
        print(f"  differs #{d['index']}: {d['question']!r} (answer {d['answer']!r}): lmms-eval {d['lmms-eval']!r}, "
              f"headsteer {d['headsteer']!r}")
    if a.json:
        a.json.write_text(json.dumps({"label": a.label, **r}, indent=2) + "\n")
    return r


if __name__ == "__main__":
    main()
