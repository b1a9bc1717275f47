"""Compare the unedited model and several edits on the same examples: a table (markdown + CSV),
a bar plot, and a self-contained HTML report."""
from __future__ import annotations

import base64
import csv
import html
import json
import re
from pathlib import Path

import numpy as np
from scipy import stats

from headsteer.errors import HeadsteerError
from headsteer.files import atomic_path, save_figure, write_text
from headsteer.fingerprint import edit_fingerprint
from headsteer.rundir import open_run, record, run_identity
from headsteer.selfcheck import SKIPPED

from .run import candidate_answers, candidates_identity, evaluate, self_check, summary

REFERENCE = "unedited"
OUTPUTS = ("compare.md", "compare.csv", "compare.png", "report.html")  # besides the sub-runs under runs/


def paired_p(a_rows, b_rows) -> float:
    """Exact McNemar test on per-example correctness (same examples, same order): a binomial test
    of the discordant pairs."""
    a = np.array([r["correct"] >= 0.5 for r in a_rows])
    b = np.array([r["correct"] >= 0.5 for r in b_rows])
    n01, n10 = int((~a & b).sum()), int((a & ~b).sum())
    if n01 + n10 == 0:
        return 1.0
    return float(stats.binomtest(n01, n01 + n10, 0.5).pvalue)


def reliance_p(a_rows, b_rows) -> float:
    """Paired t-test on per-example image reliance (same examples, same order)."""
    a = np.array([r["image_reliance"] for r in a_rows])
    b = np.array([r["image_reliance"] for r in b_rows])
    if np.allclose(a, b):
        return 1.0
    return float(stats.ttest_rel(a, b).pvalue)


def holm(pvalues) -> list[float]:
    """Holm's step-down adjustment (family-wise error) of the non-NaN p-values; NaN stays NaN.
    (scipy offers only FDR control, false_discovery_control.)"""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    return out.tolist()


P_COLUMNS = {"p_accuracy": "exact McNemar test", "p_image_reliance": "paired t-test"}


def table_rows(results: dict) -> list[dict]:
    """``results``: name -> per-example rows; the first entry is the reference (unedited). Each
    p-value compares an edit with the reference; ``*_holm`` is the same p-value Holm-adjusted over
    the edits (one family per metric)."""
    names = list(results)
    ref = results[names[0]]
    ref_s = summary(ref)
    out = []
    for name in names:
        rows = results[name]
        s = summary(rows) if name != names[0] else ref_s
        acc = s.get("accuracy", {}).get("all", {})
        row = {"edit": name, "n": s["n"]}
        if acc:
            row.update(accuracy=acc["accuracy"], ci_low=acc["ci"][0], ci_high=acc["ci"][1])
            row["delta_accuracy"] = acc["accuracy"] - ref_s["accuracy"]["all"]["accuracy"]
            row["p_accuracy"] = paired_p(ref, rows) if name != names[0] else float("nan")
        if "image_reliance" in s:
            row.update(image_reliance=s["image_reliance"], accuracy_blank_image=s["accuracy_blank_image"],
                       accuracy_no_image_flow=s["accuracy_no_image_flow"],
                       attn_to_image=float(np.mean(s["attn_to_image_per_layer"])))
            if "topk_recovered_mean" in s:
                row.update(topk_recovered_mean=s["topk_recovered_mean"], topk_recovered_ci_low=s["topk_recovered_ci"][0],
                           topk_recovered_ci_high=s["topk_recovered_ci"][1])
            row["delta_image_reliance"] = s["image_reliance"] - ref_s["image_reliance"]
            row["p_image_reliance"] = reliance_p(ref, rows) if name != names[0] else float("nan")
        out.append(row)
    for col in P_COLUMNS:
        if out and col in out[0]:
            for row, adj in zip(out, holm([r[col] for r in out])):
                row[col + "_holm"] = adj
    return _ordered(out)


def _ordered(rows: list[dict]) -> list[dict]:
    # each adjusted p-value right after its raw one
    cols = []
    for c in rows[0]:
        if not c.endswith("_holm"):
            cols.append(c)
            if c + "_holm" in rows[0]:
                cols.append(c + "_holm")
    return [{c: r[c] for c in cols} for r in rows]


def table_notes(rows: list[dict]) -> list[str]:
    """How the table's p-values were computed (printed under the table)."""
    tests = [f"{c}: {t} against {rows[0]['edit']}" for c, t in P_COLUMNS.items() if c in rows[0]]
    if not tests:
        return []
    k = len(rows) - 1
    return ["; ".join(tests) + f". *_holm: Holm-adjusted over the {k} edit{'s' * (k != 1)} compared (per metric).",
            "ci_low/ci_high: 95% BCa bootstrap interval of the accuracy; topk_recovered_mean: mean share of the "
            "image reliance the top-k heads recover alone (examples with image reliance ~0 left out), with its interval."]


def _fmt(v):
    if isinstance(v, float):
        return "–" if v != v else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    notes = table_notes(rows)
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def bar_plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["edit"] for r in rows]
    metrics = [m for m in ("accuracy", "accuracy_blank_image", "image_reliance") if m in rows[0]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        vals = [r[m] for r in rows]
        ax.bar(range(len(names)), vals, color=["#777"] + ["#3a7"] * (len(names) - 1))
        if m == "accuracy":
            err = np.array([[r["accuracy"] - r["ci_low"], r["ci_high"] - r["accuracy"]] for r in rows]).T
            ax.errorbar(range(len(names)), vals, yerr=err, fmt="none", ecolor="k", capsize=3)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(m.replace("_", " "))
    fig.tight_layout()
    png = save_figure(fig, path)
    plt.close(fig)
    return png


# What each column means, for readers of the HTML report.
GLOSSARY = {
    "accuracy": "VQA accuracy (exact match, or VQAv2 soft accuracy where there are several reference answers)",
    "ci_low / ci_high": "95% BCa bootstrap interval of the accuracy over examples",
    "delta_*": "difference from the unedited model on the same examples",
    "image_reliance": "answer logit minus the answer logit with every head's image flow ablated (mean over examples)",
    "accuracy_blank_image": "accuracy when the image is replaced by a blank (mean-colour) image",
    "accuracy_no_image_flow": "accuracy with every head's image flow ablated",
    "attn_to_image": "share of attention that text after the image puts on image tokens (mean over heads and layers)",
    "topk_recovered_mean": "mean share of image reliance the top-k attributed heads recover alone (all others ablated)",
    "p_*": "p-value of the test named under the table; *_holm: Holm-adjusted over the edits compared",
}


def _fmt_html(col: str, v) -> str:
    if col.startswith("p_") and isinstance(v, float) and v == v:
        return "&lt; 0.001" if v < 1e-3 else f"{v:.3f}"
    return html.escape(_fmt(v))


def html_report(rows, plot_png: bytes, heatmap: Path | None, title: str, settings: dict) -> str:
    """A self-contained page: settings, the table (scrolls inside its box), notes, glossary, plots."""
    def img(data):
        return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" style="max-width:100%">'

    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt_html(c, r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    setting_rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(v if isinstance(v, str) else json.dumps(v))}</td></tr>"
                           for k, v in settings.items())
    glossary = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in GLOSSARY.items())
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}"
             ".scroll{overflow-x:auto}.settings td,.settings th{text-align:left}dt{font-weight:bold}"
             "dd{margin:0 0 .5em 1.5em}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><table class='settings'>{setting_rows}</table>",
             f"<h2>Results</h2><div class='scroll'><table><tr>{head}</tr>{body}</table></div>",
             *(f"<p>{html.escape(n)}</p>" for n in table_notes(rows)),
             f"<h2>What the columns mean</h2><dl>{glossary}</dl>", "<h2>Metrics</h2>", img(plot_png)]
    if heatmap is not None and heatmap.exists():
        parts += ["<h2>Head attribution</h2>",
                  "<p>Score of each head (larger = ablating it lowers the answer more; negative = ablating it "
                  "raises the answer).</p>", img(heatmap.read_bytes())]
    parts.append("</body></html>")
    return "".join(parts)


def subrun_name(name: str, edit) -> str:
    """The sub-folder of one evaluation: by the edit's content, so equal names never share one."""
    if edit is None:
        return f"runs/{REFERENCE}"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "edit"
    return f"runs/{safe}-{edit_fingerprint(edit)[:12]}"


def compare(model, processor, dataset, edits: dict, out_dir, metrics=("accuracy", "transfer"), attribution=None,
            batch_size=16, baseline="mean", top_heads=None, progress=None, limit=None, force: bool = False,
            data_spec: dict | None = None, check: bool = True, answers: list[str] | None = None) -> list[dict]:
    """``edits``: name -> EditManifest (the unedited model is added first as 'unedited'); ``answers``: the
    closed-mode candidates (default: the data set's answer vocabulary, ``run.candidate_answers``). Each
    evaluation is a run of its own under ``out_dir/runs/`` (resumed when its identity matches, with its
    own self-check in its run.json); ``out_dir`` itself holds the comparison of this call's edits, and
    the engine's self-check on the first example before any of them."""
    if REFERENCE in edits:
        raise HeadsteerError(f"an edit is named {REFERENCE!r}, the name of the reference (the unedited model): rename it")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    runs = {name: subrun_name(name, edit) for name, edit in [(REFERENCE, None), *edits.items()]}
    candidates = candidate_answers(dataset, answers)
    settings = {"metrics": sorted(metrics), "baseline": baseline if isinstance(baseline, str) else baseline.describe(),
                "top_heads": str(top_heads) if top_heads is not None else None, "candidates": candidates_identity(candidates)}
    ident, info = run_identity("compare", model, processor, dataset, n, data_spec, settings)
    info["edits"] = {name: e.describe() for name, e in edits.items()}
    checked = self_check(model, processor, dataset[0]) if check and n else dict(SKIPPED)
    run = open_run(out_dir, ident, force=force, outputs=[*OUTPUTS, *runs.values()], info=info)
    record(run, "self_check", checked)
    record(run, "candidates", candidates)
    out = run.path
    results = {}
    for name, edit in [(REFERENCE, None), *edits.items()]:
        results[name] = evaluate(model, processor, dataset, metrics, edit=edit, batch_size=batch_size, baseline=baseline,
                                 top_heads=top_heads, out_dir=out / runs[name], progress=progress, limit=limit,
                                 data_spec=data_spec, check=check, answers=candidates)
    rows = table_rows(results)
    write_text(out / "compare.md", markdown(rows))
    with atomic_path(out / "compare.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    png = bar_plot(rows, out / "compare.png")
    settings = {"edits": {n: e.describe() for n, e in edits.items()}, "metrics": list(metrics), "n": rows[0]["n"],
                "baseline": baseline, "top_heads": str(top_heads) if top_heads is not None else None}
    hm = Path(attribution) / "heatmap.png" if attribution else None
    write_text(out / "report.html", html_report(rows, png, hm, "headsteer compare", settings))
    return rows
