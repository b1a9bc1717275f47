"""Files of an attribution run: scores.safetensors, heads.json, heatmap.png, topk_curve.png
(faithfulness and completeness vs k), layers.png (where the top heads sit), summary.md. Every file
is written through ``headsteer.files`` (a temporary name first, then renamed)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from headsteer.errors import HeadsteerError
from headsteer.files import save_figure, save_safetensors, write_json, write_text
from headsteer.paths import read_text

from .gradient import EXTRA
from .regression import fit_correlation
from .run import ranked_heads

# how each scorer makes its ranking, for summary.md
SCORED_BY = {"coar": "COAR (ridge/lasso over random ablation masks)",
             "atp": "AtP (gradient at the clean model, keys/values a head reads moving linearly)",
             "atp*": "AtP* (gradient at the clean model with the exact change of each head's output, and GradDrop)",
             "grad-coar": "grad-coar (COAR's coefficients from the gradients at random masks, trapezoid rule)"}


def save_scores(out: Path, rows, agg):
    t = {"per_image": torch.tensor(np.array([r["scores"] for r in rows]), dtype=torch.float32)}
    for k in ("mean", "stderr", "topk_freq", "single", "attention", EXTRA):
        if k in agg:
            t[k] = torch.tensor(agg[k], dtype=torch.float32)
    for key, r in agg.get("rates", {}).items():
        t[f"mean@{key}"] = torch.tensor(r["mean"], dtype=torch.float32)
    save_safetensors(t, out / "scores.safetensors", metadata={"format": "headsteer-attribution-v1"})


def load_scores(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    p = Path(path)
    return load_file(str(p / "scores.safetensors" if p.is_dir() else p))


def heads_table(agg) -> list[dict]:
    rows = []
    for rank, (l, h) in enumerate(ranked_heads(agg["mean"]), 1):
        r = {"rank": rank, "head": f"L{l}H{h}", "score": float(agg["mean"][l, h]), "stderr": float(agg["stderr"][l, h]),
             "topk_freq": float(agg["topk_freq"][l, h])}
        if "single" in agg:
            r["single"] = float(agg["single"][l, h])
            r["attention"] = float(agg["attention"][l, h])
        rows.append(r)
    return rows


def _clean(x):
    """JSON without NaN/Infinity (strict readers refuse them): None instead."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_heads_json(out: Path, settings, baseline_desc, agg, curves=None, similarity=None, extra=None):
    """heads.json. ``fit_correlation``: the held-out linear-fit correlation of the primary rate
    (called "faithfulness" before faithfulness meant the keep-only curve); ``curves``: the
    faithfulness and completeness curves and ``heads_needed``; ``rates``: each rate's ranking."""
    data = {
        "settings": settings,
        "baseline": baseline_desc,
        "n_images": agg["n_images"],
        "clean_accuracy": agg["clean_accuracy"],
        "fit_correlation": {"pearson": agg["fit_pearson"], "spearman": agg["fit_spearman"],
                            "what": "Pearson/Spearman of the linear fit's prediction vs the measured statistic on held-out "
                                    "masks (mean over images); not faithfulness"},
        "heads": heads_table(agg),
        "per_class_top": {c: [f"L{l}H{h}" for l, h in ranked_heads(v)[:5]] for c, v in agg["per_class"].items()},
    }
    if curves is not None:
        data["curves"] = curves
        data["heads_needed"] = curves["heads_needed"]
    if similarity is not None:
        data["similarity"] = similarity
    if extra:
        data.update(extra)
    data = _clean(data)
    write_json(out / "heads.json", data)
    return data


def read_ranking(run_dir, alpha=None) -> list[str]:
    """Heads of an attribution run, best first (the primary rate's, or ``alpha``'s)."""
    path = Path(run_dir) / "heads.json"
    try:
        data = json.loads(read_text(path, "heads.json"))
    except (OSError, ValueError):  # HeadsteerError too: a pipe or a loop is no heads.json
        raise HeadsteerError(f"{run_dir} has no readable heads.json: give the --out of `headsteer attribute`") from None
    if alpha is None:
        return [r["head"] for r in data["heads"]]
    for r in data.get("rates", []):
        if abs(r["alpha"] - float(alpha)) < 1e-9:
            return [h["head"] for h in r["heads"]]
    raise HeadsteerError(f"{run_dir} has no ranking at alpha {alpha}: it has {[r['alpha'] for r in data.get('rates', [])]}")


def agreement(run_a, run_b, top_frac: float = 0.1, alpha=None) -> dict:
    """Do two runs (e.g. two baselines) rank the same heads on top? Overlap of their top
    ``top_frac`` heads (count and Jaccard) and Spearman over every head's rank."""
    a, b = read_ranking(run_a, alpha), read_ranking(run_b, alpha)
    if set(a) != set(b):
        raise HeadsteerError("the two runs rank different heads (other models?): compare runs of one model")
    n = max(1, int(round(top_frac * len(a))))
    ta, tb = set(a[:n]), set(b[:n])
    rb = {h: i for i, h in enumerate(b)}
    sp = fit_correlation(np.arange(len(a)), np.array([rb[h] for h in a]))[1]
    return {"top_n": n, "overlap": len(ta & tb), "jaccard": len(ta & tb) / len(ta | tb), "rank_spearman": sp,
            "top_a": a[:n], "top_b": b[:n]}


def plot_heatmap(out: Path, scores: np.ndarray, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H = scores.shape
    fig, ax = plt.subplots(figsize=(max(4, H * 0.5 + 2), max(3, L * 0.4 + 1.5)))
    v = np.abs(scores).max() or 1.0
    im = ax.imshow(scores, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="score: drop of the statistic when ablated (< 0: ablating it raises the answer)")
    fig.tight_layout()
    save_figure(fig, out / "heatmap.png")
    plt.close(fig)


def _style(name):
    if name == "random":
        return "--", "0.45"
    return "-", None


def plot_curves(out: Path, curves: dict):
    """Faithfulness and completeness vs k (mean, 95% BCa band), and accuracy under the same
    masks; one line per ranking."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = curves["k"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for name, c in curves["rankings"].items():
        ls, color = _style(name)
        for col, (curve, acc) in enumerate((("faithfulness", "accuracy_keep"), ("completeness", "accuracy_ablate"))):
            m = np.array([np.nan if x is None else x for x in c[curve]["mean"]], dtype=float)
            lo = np.array([np.nan if x is None else x for x in c[curve]["low"]], dtype=float)
            hi = np.array([np.nan if x is None else x for x in c[curve]["high"]], dtype=float)
            line, = axes[0, col].plot(k, m, ls, color=color, lw=1.5, label=name)
            axes[0, col].fill_between(k, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
            axes[1, col].plot(k, c[acc], ls, color=line.get_color(), lw=1.5, label=name)
    d = curves["denominator"]
    axes[0, 0].set_title("faithfulness: keep only the top-k heads")
    axes[0, 1].set_title("completeness: ablate only the top-k heads")
    axes[0, 0].set_ylabel(f"share of the answer's {curves.get('statistic', 'statistic')} gap\n"
                          f"({d['n_used']} of {d['n_images']} held-out images, 95% BCa)")
    axes[1, 0].set_ylabel("accuracy")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        for lv in (0.5, 0.8, 0.9):
            ax.axhline(lv, color="0.7", lw=0.6, ls=":")
    for ax in axes[1]:
        ax.set_xlabel("k heads")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "topk_curve.png")
    plt.close(fig)


def plot_layers(out: Path, rates: list[dict], num_layers: int):
    """Per layer: how many of the top heads it holds, and its share of attribution mass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(num_layers)
    w = 0.8 / max(1, len(rates))
    for j, r in enumerate(rates):
        p = r["layer_profile"]
        label = f"alpha {r['alpha']:g}"
        axes[0].bar(x + j * w - 0.4 + w / 2, p["count_per_layer"], w, label=label)
        axes[1].bar(x + j * w - 0.4 + w / 2, p["mass_per_layer"], w, label=label)
    n = rates[0]["layer_profile"]["top_n"]
    axes[0].set_ylabel(f"heads among the top {n}")
    axes[0].yaxis.get_major_locator().set_params(integer=True)
    axes[1].set_ylabel("share of positive attribution mass")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.set_xticks(x)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "layers.png")
    plt.close(fig)


def _fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def _needed(d, K):
    if d is None:
        return "–"
    k = f"{d['k']}" if d["k"] is not None else f">{K}"
    lo = d["low"] if d["low"] is not None else f">{K}"
    hi = d["high"] if d["high"] is not None else f">{K}"
    return f"{k} [{lo}, {hi}]"


def _show_k(grid) -> list[int]:
    K = grid[-1]
    want = {0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024, K}
    return [k for k in grid if k in want]


def _regime(g: dict, what: str) -> str:
    text = f"{what} is served best by the alpha {g['alpha']:g} ranking (" + ", ".join(
        f"{a} {_fmt(v)}" for a, v in g["mean_over_k"].items()) + ")"
    if "lead" in g:
        text += (f", ahead of alpha {g['runner_up']:g} by {_fmt(g['lead'])} [{_fmt(g['lead_low'])}, {_fmt(g['lead_high'])}]"
                 + ("" if g["clear"] else ": not a clear lead"))
    return text


def write_summary(out: Path, data: dict, n_heads: int) -> str:
    h = data["heads"]
    f = data["fit_correlation"]
    s = data["settings"]
    rates = data.get("rates", [])
    alphas = ", ".join(f"{r['alpha']:g}" for r in rates) or str(s["alpha"])
    lines = ["# Head attribution", ""]
    c = data.get("curves")
    if c:
        n = c["denominator"]["n_used"]
        lines += [f"**Heads needed for 80% (of {n} held-out images):** "
                  + " ".join(f"{k.capitalize()}: {v}" for k, v in c["headline"].items()), ""]
    scorer = s.get("scorer", "coar")
    if scorer == "coar":
        work = f"masks per image: {s['masks']} per rate, alpha {alphas}, statistic: answer {s['statistic']}, fit: {s['method']}"
    elif scorer == "grad-coar":
        work = f"gradient passes per image: {s['grad_masks']} masks per rate, alpha {alphas}, statistic: answer {s['statistic']}"
    else:
        work = f"gradient passes per image: one batched forward and backward, statistic: answer {s['statistic']}"
    fit_what = {"coar": "linear-fit correlation on held-out masks (how well a linear model of the heads predicts the statistic; "
                        "not faithfulness)",
                "grad-coar": "linear-fit correlation at the gradient masks (the estimated coefficients as a linear model of the heads "
                             "against the statistic measured there; not fitted to those values)"}.get(scorer)
    lines += [
        f"- ranking by: {SCORED_BY.get(scorer, scorer)}",
        f"- images: {data['n_images']} (clean accuracy {data['clean_accuracy']:.1%}); {work}",
        f"- baseline: {data['baseline'].get('kind')} ({json.dumps(data['baseline'])})",
        (f"- {fit_what}: " + "; ".join(
            f"alpha {r['alpha']:g}: Pearson {_fmt(r['fit_correlation']['pearson'])}, Spearman "
            f"{_fmt(r['fit_correlation']['spearman'])}" for r in rates)
         if rates else f"- linear-fit correlation: Pearson {_fmt(f['pearson'])}, Spearman {_fmt(f['spearman'])}")
        if fit_what else "- linear-fit correlation: none (atp and atp* fit no linear model)",
    ]
    if "regimes" in data:
        lines.append("- regimes (mean of the curve over k; lead over the runner-up rate with its 95% paired bootstrap interval): "
                     + "; ".join(_regime(data["regimes"][r], what) for r, what in (("keep_only", "keep-only (faithfulness)"),
                                                                                    ("removal", "removal (completeness)"))))
    if c:
        K = c["k"][-1]
        d = c["denominator"]
        lines += ["", f"## Heads needed ({d['n_used']} of {d['n_images']} held-out images; statistic {c.get('statistic')})", "",
                  "Smallest k whose mean curve over images reaches the level; [95% percentile bootstrap over images]. "
                  f"Denominator s(clean) - s(all heads ablated): median {_fmt(d['gap_median'], 2)}, min {_fmt(d['gap_min'], 2)}; "
                  f"images below {_fmt(d['threshold'], 2)} ({d['min_gap_frac']:.0%} of the median) left out: "
                  f"{len(d['excluded'])}. Clean: {_fmt(c['clean']['stat'], 2)} (accuracy {c['clean']['accuracy']:.3f}); "
                  f"all heads ablated: {_fmt(c['all_ablated']['stat'], 2)} (accuracy {c['all_ablated']['accuracy']:.3f}).", "",
                  "| ranking | faithfulness 50% | 80% | 90% | completeness 50% | 80% | 90% |", "|---|---|---|---|---|---|---|"]
        for name, hn in c["heads_needed"].items():
            lines.append(f"| {name} | " + " | ".join(_needed(hn[cv][lv], K) for cv in ("faithfulness", "completeness")
                                                       for lv in ("0.5", "0.8", "0.9")) + " |")
        for cv, acc in (("faithfulness", "accuracy_keep"), ("completeness", "accuracy_ablate")):
            what = "keep only the top-k heads" if cv == "faithfulness" else "ablate only the top-k heads"
            lines += ["", f"## {cv.capitalize()} ({what}): mean [95% BCa] (accuracy)", "",
                      "| k | " + " | ".join(c["rankings"]) + " |", "|---|" + "---|" * len(c["rankings"])]
            for k in _show_k(c["k"]):
                g = c["k"].index(k)
                lines.append(f"| {k} | " + " | ".join(
                    f"{_fmt(r[cv]['mean'][g], 2)} [{_fmt(r[cv]['low'][g], 2)}, {_fmt(r[cv]['high'][g], 2)}] ({r[acc][g]:.2f})"
                    for r in c["rankings"].values()) + " |")
    elif "note" in data.get("held_out", {}):
        lines += ["", "## Faithfulness and completeness", "",
                  "Not computed: 0 held-out images (the curves never reuse the attributed ones); pass --n-eval N "
                  "with data beyond the attributed images."]
    if rates:
        lines += ["", "## Where the heads sit", "",
                  "| alpha | top heads | heads among the top per layer | attribution mass per layer | Spearman with attention weight |",
                  "|---|---|---|---|---|"]
        for r in rates:
            p = r["layer_profile"]
            ac = r.get("attention_correlation")
            lines.append(f"| {r['alpha']:g} | {', '.join(x['head'] for x in r['heads'][:p['top_n']])} | "
                         + " / ".join(str(x) for x in p["count_per_layer"]) + " | "
                         + " / ".join(f"{x:.2f}" for x in p["mass_per_layer"]) + " | "
                         + (f"{_fmt(ac['spearman'])} (per image {_fmt(ac['spearman_per_image_mean'])})" if ac else "–") + " |")
    lines += [
        "",
        f"## Top heads (alpha {rates[0]['alpha']:g})" if rates and scorer in ("coar", "grad-coar") else f"## Top heads ({scorer})",
        "",
        "| rank | head | score | stderr | top-5 freq |" + (" single-head drop | attention to image |" if "single" in h[0] else ""),
        "|---|---|---|---|---|" + ("---|---|" if "single" in h[0] else ""),
    ]
    for r in h[: min(10, len(h))]:
        row = f"| {r['rank']} | {r['head']} | {r['score']:.3f} | {r['stderr']:.3f} | {r['topk_freq']:.2f} |"
        if "single" in r:
            row += f" {_fmt(r['single'])} | {_fmt(r['attention'])} |"
        lines.append(row)
    if "similarity" in data:
        lines += ["", "## Same class vs same appearance (cosine of per-image score vectors)", ""]
        for k, v in data["similarity"].items():
            lines.append(f"- {k.replace('_', ' ')}: cosine {_fmt(v['cosine'])}, Spearman {_fmt(v['spearman'])} ({v['pairs']} pairs)")
    text = "\n".join(lines) + "\n"
    write_text(out / "summary.md", text)
    return text
