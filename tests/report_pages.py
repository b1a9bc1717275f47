"""Synthetic inputs of report.html (no model run): attribution rows, heads.json-like data and a
flow result, shaped as the pipelines make them."""
import json
import re

import numpy as np
from PIL import Image

from headsteer.attribution.html_report import attribution_payload, flow_payload, page
from headsteer.attribution.pipeline import rate_tables
from headsteer.attribution.run import aggregate, rate_key

EVIL = "</script><script>document.body.setAttribute('data-pwned','1')</script><img src=x onerror=\"document.body.setAttribute('data-pwned','2')\"> & <b>bold</b>"


def rows_of(n=5, L=2, H=3, rates=(0.1, 0.5), seed=0, questions=None, single=True):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        per = {rate_key(a): {"scores": rng.normal(size=(L, H)).round(5).tolist(), "fit_pearson": 0.9, "fit_spearman": 0.8}
               for a in rates}
        row = {**per[rate_key(rates[0])], "clean": 5.0 + i, "correct": i % 2 == 0, "rates": per, "index": i,
               "question": (questions or ["what shape is in the image?"] * n)[i], "answer": ["circle", "triangle"][i % 2],
               "qtype": "shape", "image_id": i}
        if single:
            row.update(single=rng.normal(size=(L, H)).round(5).tolist(), attention=rng.uniform(size=(L, H)).round(5).tolist())
        rows.append(row)
    return rows


def curves_of(names, K):
    k = list(range(K + 1))
    m = np.linspace(0, 1, K + 1)

    def curve():
        return {"mean": m.round(4).tolist(), "low": (m - 0.05).round(4).tolist(), "high": (m + 0.05).round(4).tolist()}

    need = {c: {lv: {"k": 3, "low": 2, "high": None, "reached_share": 1.0} for lv in ("0.5", "0.8", "0.9")}
            for c in ("faithfulness", "completeness")}
    return {"k": k, "statistic": "margin", "denominator": {"n_used": 4, "n_images": 5},
            "rankings": {n: {"faithfulness": curve(), "completeness": curve(), "accuracy_keep": m.round(3).tolist(),
                             "accuracy_ablate": m.round(3).tolist()} for n in names},
            "heads_needed": {n: need for n in names}, "headline": {"faithfulness": "f headline", "completeness": "c headline"}}


def attribution_inputs(n=5, L=2, H=3, rates=(0.1, 0.5), questions=None, curves=True, seed=0, single=True):
    rows = rows_of(n, L, H, rates, seed, questions, single)
    agg = aggregate(rows)
    names = {("attribution" if len(rates) == 1 else f"attribution@{rate_key(a)}"): a for a in rates}
    data = {"settings": {"alpha": rates[0] if len(rates) == 1 else list(rates), "masks": 16, "method": "ridge",
                         "statistic": "margin"},
            "baseline": {"kind": "zero"}, "n_images": n, "clean_accuracy": agg["clean_accuracy"],
            "primary_alpha": rates[0], "rates": rate_tables(agg, names, 0.1), "held_out": {"n_images": 5}}
    if curves:
        data["curves"] = curves_of([*names, "single-head", "attention", "random"], L * H)
    return data, agg, rows


def shape_example(size=64, box=(10, 20, 30, 40), colour=(200, 0, 0)):
    im = Image.new("RGB", (size, size), (240, 235, 230))
    im.paste(colour, box)
    mask = np.zeros((size, size), dtype=bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    return {"image": im, "object_mask": mask.tolist()}


def attribution_page(examples=None, **kw) -> tuple[str, dict, dict, list]:
    data, agg, rows = attribution_inputs(**kw)
    return page("test", attribution_payload(data, agg, rows, examples)), data, agg, rows


def flow_result(n_windows=3, measure="image_frac"):
    edges = {"image->last": [-0.1, -0.5, float("nan")][:n_windows], "question->last": [0.02, -0.2, -0.01][:n_windows]}
    return {"windows": [[i, i] for i in range(n_windows)], "n_images": 2, "measure": measure, "clean_mean": 3.0,
            "image_effect_mean": -1.5, "excluded_images": 0, "edges": edges,
            "stderr": {e: [0.01] * n_windows for e in edges}}


def flow_page(measure="image_frac") -> str:
    return page("flow test", flow_payload(flow_result(measure=measure), "change (%)", "what a number means", ["- a line"], {"window": 1}))


def blob_text(text: str) -> str:
    """The JSON blob of a report page, as it stands in the page."""
    m = re.search(r"<script type='application/json' id='headsteer-data'>(.*?)</script>", text, re.S)
    assert m, "no data blob"
    return m.group(1)


def blob(text: str) -> dict:
    """The JSON blob of a report page, read (strictly: NaN or Infinity in it fail)."""
    def refuse(c):
        raise ValueError(f"{c} in the data blob")

    return json.loads(blob_text(text), parse_constant=refuse)
