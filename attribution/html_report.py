"""``report.html``: one self-contained, interactive page per ``headsteer attribute`` or ``headsteer
flow`` run, to look at rather than read.

Everything is inside the one file: the numbers as one JSON blob (``<script type="application/json">``),
the images as base64 data URIs, and a small vanilla-JS renderer (``report.js``, beside this module)
that draws the figures as SVG. Nothing is fetched: the page's Content-Security-Policy allows no
network source at all and only the renderer's own script (by its hash), so a page that tried to load
anything, or a string in the data that tried to become a script, would be blocked by the browser. The
renderer writes every string from the data with ``textContent`` (never as markup), and the JSON blob
escapes ``<``, ``>`` and ``&`` so it cannot close its own script element."""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from headsteer.files import write_text

from .run import rate_key

REPORT = "report.html"
SCRIPT = (Path(__file__).with_name("report.js")).read_text(encoding="utf-8")
STYLE = (Path(__file__).with_name("report.css")).read_text(encoding="utf-8")
THUMB_SIDE = 128  # pixels: the longest side of an inlined image (smaller images stay as they are)
DIGITS = 4  # significant digits of the numbers in the page (the files beside it hold them all)


def _num(x, digits: int = DIGITS):
    """A JSON-ready number rounded to ``digits`` significant digits; None for NaN/inf/None."""
    if x is None or isinstance(x, bool):
        return x
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _rounded(x, digits: int = DIGITS):
    """``x`` (dicts, lists, numbers) with every float rounded by ``_num``."""
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v, digits) for v in x]
    if isinstance(x, (float, np.floating)):
        return _num(x, digits)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _flat(a) -> list:
    """[L, H] -> a flat list of L*H rounded numbers (head l, h at l*H + h)."""
    return [_num(v) for v in np.asarray(a, dtype=float).ravel()]


def _json_for_script(obj) -> str:
    """JSON that can sit inside a ``<script>`` element: ``<``, ``>`` and ``&`` (which occur only inside
    JSON strings) and the two line separators JavaScript once refused are written as escapes."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def page(title: str, payload: dict) -> str:
    """The whole page: ``payload`` (its ``kind`` says which view the script draws) and the script."""
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode("utf-8")).digest()).decode()
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"
    return ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{csp}\">"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            "<noscript><p>This report draws its figures with JavaScript; summary.md and the JSON files beside it hold "
            "the same numbers.</p></noscript><div id='app'></div>"
            f"<script type='application/json' id='headsteer-data'>{_json_for_script(payload)}</script>"
            f"<script>{SCRIPT}</script></body></html>\n")


# -- images ----------------------------------------------------------------------------------------

def _data_uri(im: Image.Image) -> str:
    """The smaller of a PNG and a JPEG (quality 85) encoding: PNG for drawings, JPEG for photos."""
    options = []
    for fmt, kw in (("PNG", {"optimize": True}), ("JPEG", {"quality": 85})):
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        options.append((len(buf.getvalue()), fmt.lower(), buf.getvalue()))
    _, fmt, data = min(options)
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode()}"


def _example_mask(example: dict, size: tuple[int, int]):
    """bool [h, w] at ``size`` (w, h): the example's object pixels, from ``object_mask`` (easy-VQA) or
    ``object_box`` (a local data file's ``box`` column, with the image size it is measured in); else None."""
    w, h = size
    if example.get("object_mask") is not None:
        m = np.asarray(example["object_mask"], dtype=bool)
        if m.ndim != 2 or not m.size:
            return None
        return np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
    if example.get("object_box") is not None:
        x0, y0, x1, y1, W, H = (float(v) for v in example["object_box"])
        m = np.zeros((h, w), dtype=bool)
        m[int(round(y0 * h / H)) : max(int(round(y1 * h / H)), int(round(y0 * h / H)) + 1),
          int(round(x0 * w / W)) : max(int(round(x1 * w / W)), int(round(x0 * w / W)) + 1)] = True
        return m
    return None


def image_entry(example: dict, max_side: int = THUMB_SIDE) -> dict | None:
    """The example's image as a thumbnail data URI, and its object mask as an overlay (background
    dimmed, the object's edge in orange, the object itself clear) where the data has one."""
    im = example.get("image")
    if im is None:
        return None
    im = im.convert("RGB")
    w0, h0 = im.size
    scale = min(1.0, max_side / max(w0, h0))
    size = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
    thumb = im.resize(size, Image.LANCZOS) if scale < 1 else im
    entry = {"src": _data_uri(thumb), "w": size[0], "h": size[1], "size": [w0, h0]}
    mask = _example_mask(example, size)
    if mask is not None:
        rgba = np.zeros((size[1], size[0], 4), dtype=np.uint8)
        rgba[~mask] = (0, 0, 0, 160)
        inner = mask.copy()  # object pixels whose four neighbours are object pixels too
        inner[1:] &= mask[:-1]
        inner[:-1] &= mask[1:]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        rgba[mask & ~inner] = (255, 120, 0, 255)
        buf = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buf, format="PNG", optimize=True)
        entry.update(mask=f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}",
                     mask_from="object_mask" if example.get("object_mask") is not None else "box",
                     object_share=_num(mask.mean()))
    return entry


# -- the attribute report --------------------------------------------------------------------------

def _row_scores(r: dict, key: str):
    return r.get("rates", {}).get(key, {}).get("scores", r["scores"])


def attribution_payload(data: dict, agg: dict, rows: list[dict], examples=None, max_side: int = THUMB_SIDE) -> dict:
    """What the attribute view draws. ``data``: heads.json's content; ``agg``: ``run.aggregate(rows)``;
    ``examples``: the data set's example of each row (image, and object_mask or object_box where the
    data has them), or None for a report without images."""
    mean = np.asarray(agg["mean"], dtype=float)
    L, H = mean.shape
    rates = []
    for r in data.get("rates") or [{"alpha": data["settings"]["alpha"], "ranking": "attribution"}]:
        key = rate_key(r["alpha"])
        a = agg.get("rates", {}).get(key, agg)
        rates.append({"alpha": r["alpha"], "key": key, "ranking": r.get("ranking", "attribution"),
                      "mean": _flat(a["mean"]), "stderr": _flat(a["stderr"]), "topk_freq": _flat(a["topk_freq"]),
                      **_rounded({k: r.get(k) for k in ("fit_correlation", "layer_profile", "attention_correlation")})})
    images, per_image = {}, []
    for j, r in enumerate(rows):
        entry = image_entry(examples[j], max_side) if examples is not None else None
        key = None
        if entry is not None:
            key = hashlib.sha1((entry["src"] + entry.get("mask", "")).encode()).hexdigest()[:12]
            images.setdefault(key, entry)
        per_image.append({"index": r.get("index", j), "question": r.get("question"), "answer": r.get("answer"),
                          "qtype": r.get("qtype"), "image_id": r.get("image_id"), "correct": r.get("correct"),
                          "clean": _num(r.get("clean")), "fit_pearson": _num(r.get("fit_pearson")),
                          "scores": {x["key"]: _flat(_row_scores(r, x["key"])) for x in rates},
                          **({"single": _flat(r["single"]), "attention": _flat(r["attention"])} if "single" in r else {}),
                          "image": key})
    curves = data.get("curves")
    if curves:
        curves = {"k": curves["k"], "headline": curves.get("headline"), "heads_needed": curves.get("heads_needed"),
                  "denominator": curves.get("denominator"), "clean": curves.get("clean"),
                  "all_ablated": curves.get("all_ablated"), "statistic": curves.get("statistic"),
                  "rankings": {name: {c: c_val for c, c_val in v.items()
                                      if c in ("faithfulness", "completeness", "accuracy_keep", "accuracy_ablate")}
                               for name, v in curves["rankings"].items()}}
    return {"kind": "attribute", "L": L, "H": H, "settings": data.get("settings"), "baseline": data.get("baseline"),
            "n_images": data.get("n_images"), "clean_accuracy": data.get("clean_accuracy"),
            "primary_alpha": data.get("primary_alpha"), "rates": rates,
            "single": _flat(agg["single"]) if "single" in agg else None,
            "attention": _flat(agg["attention"]) if "attention" in agg else None,
            "curves": curves, "held_out": data.get("held_out"), "regimes": _rounded(data.get("regimes")),
            "similarity": _rounded(data.get("similarity")), "per_image": per_image, "images": images}


def write_attribution_report(out: Path, data: dict, agg: dict, rows: list[dict], examples=None) -> Path:
    n = data.get("n_images", len(rows))
    scorer = (data.get("settings") or {}).get("scorer", "coar")
    title = f"headsteer attribute ({scorer}): {n} image{'s' * (n != 1)}"
    return write_text(Path(out) / REPORT, page(title, attribution_payload(data, agg, rows, examples)))


# -- the flow report -------------------------------------------------------------------------------

def flow_payload(flow: dict, ylabel: str, words: str, lines: list[str], settings: dict | None = None) -> dict:
    """What the flow view draws: ``flow`` (flow.json's content), the y-axis label and the sentence
    that say what a number means, and the summary's statements."""
    return {"kind": "flow", "flow": _rounded(flow, 6), "ylabel": ylabel, "words": words, "lines": list(lines),
            "settings": settings or {}}


def write_flow_report(out: Path, flow: dict, ylabel: str, words: str, lines: list[str], settings: dict | None = None) -> Path:
    n = flow.get("n_images", 0)
    title = f"headsteer flow: {n} image{'s' * (n != 1)}"
    return write_text(Path(out) / REPORT, page(title, flow_payload(flow, ylabel, words, lines, settings)))
