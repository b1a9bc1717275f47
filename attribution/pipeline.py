"""``headsteer attribute`` as one library call: attribution over a data set, the paper's
comparisons on held-out images, and the output files."""
from __future__ import annotations

from pathlib import Path

from headsteer.adapters import get_adapter

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


def attribute_dataset(model, processor, dataset, settings: Settings, out_dir, k_max=None, n_eval=40, progress=None):
    ad = get_adapter(model, processor)
    out = Path(out_dir)
    rows = run_attribution(model, processor, dataset, settings, out, progress=progress)
    from headsteer.eval.run import process_shard

    if process_shard()[0] != 0:
        return None  # the main process aggregates and writes the outputs
    agg = aggregate(rows)
    n_heads = ad.num_layers * ad.num_heads
    k_max = k_max or max(3, min(n_heads // 4, 16))
    curves = similarity = comparison = None
    if settings.compare:
        rankings = {"attribution": ranked_heads(agg["mean"]), "single-head": ranked_heads(agg["single"]),
                    "attention": ranked_heads(agg["attention"])}
        start = min(settings.n_images, len(dataset))
        held = [dataset[i] for i in range(start, min(len(dataset), start + n_eval))] or [dataset[i] for i in range(start)]
        from .engine import as_baseline

        base = as_baseline(model, processor, settings.baseline, dataset)
        curves = topk_curves(model, processor, held, rankings, k_max, base, settings.statistic, seed=settings.seed, progress=progress)
        comparison = compare_rankings(curves, min(k_max, max(1, n_heads // 10)))
    if "image_id" in dataset.column_names and rows:
        shapes, colors = easy_vqa_labels([r["image_id"] for r in rows])
        # not every image has a colour (or shape) question: compare the images whose both labels are known
        keep = [i for i, (s, c) in enumerate(zip(shapes, colors)) if s is not None and c is not None]
        if len(keep) >= 4:
            import numpy as np

            similarity = group_similarity(np.array([rows[i]["scores"] for i in keep]), [shapes[i] for i in keep],
                                          [colors[i] for i in keep])
    from .engine import as_baseline

    base_desc = as_baseline(model, processor, settings.baseline, dataset).describe()
    from dataclasses import asdict

    data = report.write_heads_json(out, asdict(settings), base_desc, agg, curves, similarity,
                                   {"comparison": comparison} if comparison else None)
    report.save_scores(out, rows, agg)
    report.plot_heatmap(out, agg["mean"], f"head attribution ({agg['n_images']} images, {settings.baseline} baseline)")
    if curves:
        report.plot_curves(out, curves, settings.statistic)
    report.write_summary(out, data, n_heads)
    return data
