"""``headsteer attribute`` as one library call: attribution over a data set, the paper's
comparisons on held-out images, and the output files."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from headsteer.adapters import get_adapter
from headsteer.baseline import as_baseline
from headsteer.data import data_origin
from headsteer.parallel import process_shard

from . import report
from .curves import topk_curves
from .run import Settings, aggregate, ranked_heads, run_attribution
from .similarity import easy_vqa_labels, group_similarity


def compare_rankings(curves: dict, k_limit: int) -> str:
    """At which k the attribution ranking's top-k hurts most — lower than every other ranking —
    in accuracy and in the statistic; k <= k_limit (10% of heads) is the paper's regime."""
    others = [n for n in curves if n != "attribution"]
    K = len(curves["attribution"]["k"]) - 1

    def wins(metric):
        return [k for k in range(1, K + 1) if all(curves["attribution"][metric][k] < curves[n][metric][k] for n in others)]

    acc, stat = wins("accuracy"), wins("stat")
    small = [k for k in acc if k <= k_limit]
    verdict = (f"Attribution's top-k lowers accuracy more than every other ranking at k = {small} (k <= {k_limit}, 10% of heads)."
               if small else f"Attribution's top-k does not lower accuracy more than every other ranking for any k <= {k_limit} (10% of heads).")
    verdict += f" Over k = 1..{K} it is lowest in accuracy at k = {acc or 'none'} and in the statistic at k = {stat or 'none'}."
    per_k = "; ".join(
        f"k={k}: " + ", ".join(f"{n} {curves[n]['accuracy'][k]:.3f}" for n in curves) for k in range(1, k_limit + 1)
    )
    return verdict + " Accuracy: " + per_k


def similarity_labels(dataset, rows):
    """(shape, colour) of each attributed easy-VQA image, read from the questions of the split
    the data came from; None when the data is not easy-VQA or its split is unknown."""
    origin = data_origin(dataset, exact=False) or {}
    if origin.get("spec") != "easy-vqa" or not origin.get("split") or "image_id" not in dataset.column_names:
        return None
    return easy_vqa_labels([r["image_id"] for r in rows], origin["split"])


def attribute_dataset(model, processor, dataset, settings: Settings, out_dir, k_max=None, n_eval=40, progress=None,
                      force: bool = False, data_spec: dict | None = None):
    """Attribution of the first ``settings.n_images`` examples (resumable, see ``run_attribution``),
    then the top-k ablation curves on the next ``n_eval`` examples — held out: with none there,
    there are no curves, and the outputs say so."""
    ad = get_adapter(model, processor)
    out = Path(out_dir)
    rows = run_attribution(model, processor, dataset, settings, out, progress=progress, force=force, data_spec=data_spec)
    if process_shard()[0] != 0:
        return None  # the main process aggregates and writes the outputs
    agg = aggregate(rows)
    n_heads = ad.num_layers * ad.num_heads
    k_max = k_max or max(3, min(n_heads // 4, 16))
    base = as_baseline(model, processor, settings.baseline, dataset)
    start = min(settings.n_images, len(dataset))
    held = [dataset[i] for i in range(start, min(len(dataset), start + max(0, n_eval)))] if settings.compare else []
    held_out = {"n_images": len(held), "indices": [start, start + len(held)]}
    curves = similarity = comparison = None
    if settings.compare and held:
        rankings = {"attribution": ranked_heads(agg["mean"]), "single-head": ranked_heads(agg["single"]),
                    "attention": ranked_heads(agg["attention"])}
        curves = topk_curves(model, processor, held, rankings, k_max, base, settings.statistic, seed=settings.seed, progress=progress)
        comparison = compare_rankings(curves, min(k_max, max(1, n_heads // 10)))
    elif settings.compare:
        held_out["note"] = "no held-out images after the attributed ones: top-k ablation curves not computed"
    labels = similarity_labels(dataset, rows) if rows else None
    if labels is not None:
        shapes, colors = labels
        # not every image has a colour (or shape) question: compare the images whose both labels are known
        keep = [i for i, (s, c) in enumerate(zip(shapes, colors)) if s is not None and c is not None]
        if len(keep) >= 4:
            similarity = group_similarity(np.array([rows[i]["scores"] for i in keep]), [shapes[i] for i in keep],
                                          [colors[i] for i in keep])
    extra = {"held_out": held_out, **({"comparison": comparison} if comparison else {})}
    data = report.write_heads_json(out, asdict(settings), base.describe(), agg, curves, similarity, extra)
    report.save_scores(out, rows, agg)
    report.plot_heatmap(out, agg["mean"], f"head attribution ({agg['n_images']} images, {settings.baseline} baseline)")
    if curves:
        report.plot_curves(out, curves, settings.statistic)
    else:
        (out / "topk_curve.png").unlink(missing_ok=True)  # an earlier run's curves are not this run's
    report.write_summary(out, data, n_heads)
    return data
