"""Files of an attribution run: scores.safetensors, heads.json, heatmap.png, topk_curve.png,
summary.md. Every file is written to a temporary name first, then renamed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from headsteer.files import save_figure, save_safetensors, write_json, write_text

from .run import ranked_heads


def save_scores(out: Path, rows, agg):
    t = {"per_image": torch.tensor(np.array([r["scores"] for r in rows]), dtype=torch.float32)}
    for k in ("mean", "stderr", "topk_freq", "single", "attention"):
        if k in agg:
            t[k] = torch.tensor(agg[k], dtype=torch.float32)
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


def write_heads_json(out: Path, settings, baseline_desc, agg, curves=None, similarity=None, extra=None):
    data = {
        "settings": settings,
        "baseline": baseline_desc,
        "n_images": agg["n_images"],
        "clean_accuracy": agg["clean_accuracy"],
        "faithfulness": {"pearson": agg["pearson"], "spearman": agg["spearman"]},
        "heads": heads_table(agg),
        "per_class_top": {c: [f"L{l}H{h}" for l, h in ranked_heads(v)[:5]] for c, v in agg["per_class"].items()},
    }
    if curves is not None:
        data["topk_curves"] = curves
    if similarity is not None:
        data["similarity"] = similarity
    if extra:
        data.update(extra)
    write_json(out / "heads.json", data)
    return data


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
    fig.colorbar(im, ax=ax, label="score (drop of the statistic when ablated)")
    fig.tight_layout()
    save_figure(fig, out / "heatmap.png")
    plt.close(fig)


def plot_curves(out: Path, curves: dict, stat_name: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in curves.items():
        style = "--" if name == "random" else "-"
        axes[0].plot(c["k"], c["stat"], style, marker="o", ms=3, label=name)
        axes[1].plot(c["k"], c["accuracy"], style, marker="o", ms=3, label=name)
    axes[0].set_ylabel(f"mean answer {stat_name}")
    axes[1].set_ylabel("accuracy")
    for ax in axes:
        ax.set_xlabel("k heads ablated (top-k of each ranking)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, out / "topk_curve.png")
    plt.close(fig)


def write_summary(out: Path, data: dict, n_heads: int) -> str:
    h = data["heads"]
    f = data["faithfulness"]
    s = data["settings"]
    lines = [
        "# Head attribution",
        "",
        f"- images: {data['n_images']} (clean accuracy {data['clean_accuracy']:.1%}); masks per image: {s['masks']}, "
        f"alpha {s['alpha']}, statistic: answer {s['statistic']}, fit: {s['method']}",
        f"- baseline: {data['baseline'].get('kind')} ({json.dumps(data['baseline'])})",
        f"- faithfulness on held-out masks (mean over images): Pearson {f['pearson']:.3f}, Spearman {f['spearman']:.3f}",
        "",
        "| rank | head | score | stderr | top-5 freq |" + (" single-head drop | attention to image |" if "single" in h[0] else ""),
        "|---|---|---|---|---|" + ("---|---|" if "single" in h[0] else ""),
    ]
    for r in h[: min(10, len(h))]:
        row = f"| {r['rank']} | {r['head']} | {r['score']:.3f} | {r['stderr']:.3f} | {r['topk_freq']:.2f} |"
        if "single" in r:
            row += f" {r['single']:.3f} | {r['attention']:.3f} |"
        lines.append(row)
    if "topk_curves" in data:
        c = data["topk_curves"]
        lines += ["", f"## Top-k ablation ({data.get('held_out', {}).get('n_images', '?')} held-out images)", "", "| k | " + " | ".join(f"{n} acc" for n in c) + " |",
                  "|---|" + "---|" * len(c)]
        for k in c[next(iter(c))]["k"]:
            lines.append(f"| {k} | " + " | ".join(f"{c[n]['accuracy'][k]:.3f}" for n in c) + " |")
        if "comparison" in data:
            lines += ["", data["comparison"]]
    elif "note" in data.get("held_out", {}):
        lines += ["", "## Top-k ablation", "",
                  "Not computed: 0 held-out images (the curves never reuse the attributed ones); pass --n-eval N "
                  "with data beyond the attributed images."]
    if "similarity" in data:
        lines += ["", "## Same class vs same appearance (cosine of per-image score vectors)", ""]
        for k, v in data["similarity"].items():
            lines.append(f"- {k.replace('_', ' ')}: cosine {v['cosine']:.3f}, Spearman {v['spearman']:.3f} ({v['pairs']} pairs)")
    text = "\n".join(lines) + "\n"
    write_text(out / "summary.md", text)
    return text
