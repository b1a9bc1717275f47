"""``headsteer attribute`` as one library call: attribution over a data set (one ranking per
ablation rate), the paper's yardstick on held-out images (faithfulness and completeness curves
of every ranking, heads needed), where the heads sit, and the output files."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from headsteer.adapters import get_adapter
from headsteer.baseline import as_baseline
from headsteer.data import data_origin
from headsteer.errors import HeadsteerError
from headsteer.heads import model_record
from headsteer.parallel import process_shard

from . import html_report, report
from .curves import headline, k_grid, measure, random_rankings, summarize
from .engine import AblationRunner
from .gradient import EXTRA
from .regression import fit_correlation
from .run import Settings, aggregate, answer_candidates, ranked_heads, rate_key, run_attribution, self_check
from .similarity import easy_vqa_labels, group_similarity


def similarity_labels(dataset, rows):
    """(shape, colour) of each attributed easy-VQA image, read from the questions of the split
    the data came from; None when the data is not easy-VQA or its split is unknown."""
    origin = data_origin(dataset, exact=False) or {}
    if origin.get("spec") != "easy-vqa" or not origin.get("split") or "image_id" not in dataset.column_names:
        return None
    return easy_vqa_labels([r["image_id"] for r in rows], origin["split"])


def ranking_names(settings: Settings) -> dict[str, float]:
    """Name of each rate's attribution ranking in the curves -> its rate."""
    rates = settings.rates
    return {("attribution" if len(rates) == 1 else f"attribution@{rate_key(a)}"): a for a in rates}


def layer_profile(scores: np.ndarray, top_frac: float = 0.1) -> dict:
    """Where the top heads sit: how many of the top ``top_frac`` heads each layer holds, and each
    layer's share of the positive attribution mass (scores below 0 count as 0)."""
    L, H = scores.shape
    n = max(1, int(round(top_frac * L * H)))
    count = np.zeros(L, dtype=int)
    for l, _ in ranked_heads(scores)[:n]:
        count[l] += 1
    pos = np.clip(scores, 0, None).sum(1)
    mass = pos / pos.sum() if pos.sum() > 0 else np.zeros(L)
    return {"top_n": n, "top_frac": top_frac, "count_per_layer": count.tolist(),
            "mass_per_layer": [round(float(x), 6) for x in mass]}


def attention_correlation(agg: dict, scores: np.ndarray, per_image: np.ndarray) -> dict:
    """Rank correlation (scipy Spearman, average ranks for ties) between attribution scores and
    attention weight to the image, over heads: of the means, and the mean of per-image ones."""
    p, s = fit_correlation(scores.ravel(), agg["attention"].ravel())
    per = [fit_correlation(a.ravel(), b.ravel())[1] for a, b in zip(per_image, agg["attention_per_image"])]
    return {"spearman": s, "pearson": p, "spearman_per_image_mean": float(np.nanmean(per)) if per else float("nan")}


def rate_tables(agg: dict, names: dict[str, float], top_frac: float) -> list[dict]:
    out = []
    for name, a in names.items():
        r = agg["rates"][rate_key(a)]
        entry = {"alpha": a, "ranking": name, "fit_correlation": {"pearson": r["fit_pearson"], "spearman": r["fit_spearman"]},
                 "heads": [{"head": f"L{l}H{h}", "score": round(float(r["mean"][l, h]), 6),
                            "stderr": round(float(r["stderr"][l, h]), 6)} for l, h in ranked_heads(r["mean"])],
                 "layer_profile": layer_profile(r["mean"], top_frac)}
        if "attention" in agg:
            entry["attention_correlation"] = attention_correlation(agg, r["mean"], r["per_image"])
        out.append(entry)
    return out


def attribute_dataset(model, processor, dataset, settings: Settings, out_dir, k_max=None, n_eval=40, progress=None,
                      force: bool = False, data_spec: dict | None = None, min_gap_frac: float = 0.1, n_boot: int = 1000,
                      top_frac: float = 0.1, check: bool = True):
    """Attribution of the first ``settings.n_images`` examples (resumable, see ``run_attribution``),
    then faithfulness and completeness curves of every ranking on the next ``n_eval`` examples —
    held out: with none there, there are no curves, and the outputs say so. ``k_max``: the
    largest k of the curves (default: every head); ``min_gap_frac``: the per-image denominator
    guard (``curves.normalize``); ``top_frac``: the share of heads the layer profile counts; ``check``:
    the engine's self-check on the first example (False: skipped, ``--no-self-check``)."""
    if not 0 < top_frac <= 1 or not 0 <= min_gap_frac < 1:
        raise HeadsteerError("top_frac must be in (0, 1] and min_gap_frac in [0, 1)")
    ad = get_adapter(model, processor)
    out = Path(out_dir)
    base = as_baseline(model, processor, settings.baseline, dataset)
    checked = self_check(model, processor, dataset[0], base, settings) if check and len(dataset) else False
    rows = run_attribution(model, processor, dataset, settings, out, progress=progress, force=force, data_spec=data_spec,
                           check=checked)
    fast = checked["fast"] if checked else True
    if process_shard()[0] != 0:
        return None  # the main process aggregates and writes the outputs
    agg = aggregate(rows)
    L, H = ad.num_layers, ad.num_heads
    grid = k_grid(L * H, k_max)
    start = min(settings.n_images, len(dataset))
    held = [dataset[i] for i in range(start, min(len(dataset), start + max(0, n_eval)))] if settings.compare else []
    held_out = {"n_images": len(held), "indices": [start, start + len(held)]}
    names = ranking_names(settings)
    curves = similarity = regimes = None
    if settings.compare and held:
        rankings = {n: ranked_heads(agg["rates"][rate_key(a)]["mean"]) for n, a in names.items()}
        if EXTRA in agg:
            rankings[EXTRA] = ranked_heads(agg[EXTRA])
        rankings.update({"single-head": ranked_heads(agg["single"]), "attention": ranked_heads(agg["attention"])})
        rankings.update({f"random#{j}": r for j, r in enumerate(random_rankings(L, H, settings.n_random, settings.seed))})
        cands = answer_candidates(ad, dataset)

        def logits_of(i, masks):
            return AblationRunner(model, processor, base, fast=None if fast else False).prepare(held[i]["image"], held[i]["question"])(masks)

        raw = measure(held, rankings, grid, L, H, logits_of, lambda i: ad.answer_token_id(held[i]["answer"], held[i]["question"]),
                      settings.statistic, cands, progress)
        curves = summarize(raw, list(rankings), grid, min_gap_frac=min_gap_frac, n_boot=n_boot, seed=settings.seed, rates=names)
        curves.update(statistic=settings.statistic, n_random=settings.n_random, masks_per_image=raw["n_masks"],
                      accuracy="the answer ranks first among the data set's answers (first tokens)")
        curves["headline"] = headline(curves, 0.8)
        regimes = curves.pop("regimes", None)
    elif settings.compare:
        held_out["note"] = "no held-out images after the attributed ones: faithfulness and completeness curves not computed"
    labels = similarity_labels(dataset, rows) if rows else None
    if labels is not None:
        shapes, colors = labels
        # not every image has a colour (or shape) question: compare the images whose both labels are known
        keep = [i for i, (s, c) in enumerate(zip(shapes, colors)) if s is not None and c is not None]
        if len(keep) >= 4:
            similarity = group_similarity(np.array([rows[i]["scores"] for i in keep]), [shapes[i] for i in keep],
                                          [colors[i] for i in keep])
    rates = rate_tables(agg, names, top_frac)
    extra = {"held_out": held_out, "scorer": settings.scorer, "primary_alpha": settings.rates[0], "rates": rates,
             "model": model_record(model, L, H),  # what an edit --from-attribution checks it is applied to
             "layer_profile": rates[0]["layer_profile"],
             **({"attention_correlation": rates[0]["attention_correlation"]} if "attention_correlation" in rates[0] else {}),
             **({"regimes": regimes} if regimes else {})}
    data = report.write_heads_json(out, asdict(settings), base.describe(), agg, curves, similarity, extra)
    report.save_scores(out, rows, agg)
    rate = "" if settings.scorer in ("atp", "atp*") else f", alpha {rate_key(settings.rates[0])}"
    report.plot_heatmap(out, agg["mean"], f"head attribution by {settings.scorer} ({agg['n_images']} images, "
                                          f"{settings.baseline} baseline{rate})")
    report.plot_layers(out, rates, L)
    if curves:
        report.plot_curves(out, curves)
    else:
        (out / "topk_curve.png").unlink(missing_ok=True)  # an earlier run's curves are not this run's
    report.write_summary(out, data, L * H)
    html_report.write_attribution_report(out, data, agg, rows, [dataset[r["index"]] for r in rows])
    return data

