"""The gradient scorers against what they estimate (docs/results.md): atp and atp* against exact
single-head ablation, grad-coar against COAR fitted on the same images at the same rate — on the
default model (easy-VQA shape questions, the margin over the data set's answers, mean baseline) and on
the tiny random model of every family that has the fast path (one prompt each; margin over the clean
model's top 4 tokens; a random K/V baseline).

    python scripts/validate_gradient.py                       # default model, 40 images
    python scripts/validate_gradient.py --families            # + every tiny family with the fast path
    python scripts/validate_gradient.py --n-images 8 --families --only llava,qwen3_5

Figures: Spearman of the mean scores over images, top-10% recall of that ranking, and the mean over
images of the per-image Spearman and top-10% recall. Variants measured beside the scorers: atp* without
GradDrop, atp* with the value part linear at the clean pattern (Kramár et al.'s separate-node QK fix),
atp* with the statistic's max over the other answers linearised (no exact readout), and COAR against
itself with other masks (its own noise at this number of masks), and grad-coar with the plain mean of
the gradients in place of the trapezoid rule.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import _checkout  # noqa: F401  (refuses to run against another tree's headsteer)
import numpy as np
import torch
from scipy.stats import spearmanr

import headsteer
from headsteer.attribution import gradient as G
from headsteer.attribution.engine import AblationRunner
from headsteer.attribution.regression import fit, sample_masks
from headsteer.attribution.run import answer_candidates
from headsteer.baseline import as_baseline
from headsteer.data import load_data
from headsteer.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]


def recall(a, b, frac=0.1) -> float:
    n = max(1, round(frac * len(a)))
    return len(set(np.argsort(-a)[:n]) & set(np.argsort(-b)[:n])) / n


def rho(a, b) -> float:
    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else float("nan")


def one_prompt(runner, answer_id, candidates, masks, seed, timing) -> dict:
    """Every scorer and reference on one prepared prompt: [L*H] arrays."""
    ad = runner.ad
    L, H = ad.num_layers, ad.num_heads
    readout = G.Readout(answer_id, "margin", candidates)
    out = {}
    t = time.perf_counter()
    eye = torch.eye(L * H, dtype=torch.bool).view(L * H, L, H)
    y = runner(torch.cat([torch.zeros(1, L, H, dtype=torch.bool), eye]), readout)
    out["single"] = (y[0] - y[1:]).numpy()
    timing["single"] += time.perf_counter() - t
    for name, seed_off in (("coar", 0), ("coar, other masks", 7919)):
        t = time.perf_counter()
        m = sample_masks(masks, L, H, 0.1, seed + seed_off)
        out[name] = fit(m, runner(m, readout), seed=seed).scores.reshape(-1)
        timing[name] += time.perf_counter() - t
    for scorer in G.GRADIENT:
        t = time.perf_counter()
        out[scorer] = G.score_heads(runner, scorer, readout, 0.1, 32, seed)[0].numpy().reshape(-1)
        timing[scorer] += time.perf_counter() - t
    variants = {"atp* without GradDrop": dict(grad_drop=False),
                "atp* with the clean-pattern value part (path pattern)": dict(path="pattern"),
                "atp* with the max linearised": dict(exact_readout=False)}
    for name, kw in variants.items():
        out[name] = G.atp_star(runner, readout, **kw)[0].numpy().reshape(-1)
    out["grad-coar, mean of the gradients"] = G.grad_coar(runner, readout, 0.1, 32, seed, trapezoid=False)[0].numpy().reshape(-1)
    return out


def table(per: dict[str, np.ndarray], pairs) -> list[dict]:
    rows = []
    for k, ref in pairs:
        a, b = per[k], per[ref]
        rows.append({"scores": k, "against": ref, "spearman_of_means": rho(a.mean(0), b.mean(0)),
                     "top10_recall_of_means": recall(a.mean(0), b.mean(0)),
                     "spearman_per_image": float(np.nanmean([rho(x, y) for x, y in zip(a, b)])),
                     "top10_recall_per_image": float(np.mean([recall(x, y) for x, y in zip(a, b)]))})
    return rows


PAIRS = [("atp", "single"), ("atp*", "single"), ("atp* without GradDrop", "single"),
         ("atp* with the clean-pattern value part (path pattern)", "single"), ("atp* with the max linearised", "single"),
         ("grad-coar", "coar"), ("grad-coar, mean of the gradients", "coar"), ("coar, other masks", "coar"),
         ("grad-coar", "single"), ("coar", "single")]


def default_model(n_images, masks):
    model, proc = headsteer.load("default")
    ad = headsteer.get_adapter(model, proc)
    ds = load_data("easy-vqa", limit=n_images, qtypes=("shape",))
    base = as_baseline(model, proc, "mean", ds)
    cands = answer_candidates(ad, ds)
    per, timing = {}, {k: 0.0 for k in ("single", "coar", "coar, other masks", *G.GRADIENT)}
    for i in range(len(ds)):
        ex = ds[i]
        runner = AblationRunner(model, proc, base).prepare(ex["image"], ex["question"])
        got = one_prompt(runner, ad.answer_token_id(ex["answer"], ex["question"]), cands, masks, i, timing)
        for k, v in got.items():
            per.setdefault(k, []).append(v)
    per = {k: np.stack(v) for k, v in per.items()}
    return table(per, PAIRS), {k: v / len(ds) for k, v in timing.items()}


def families(only, masks):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_intervene import mean_like_baseline  # the tests' random K/V baseline; tests/ is not a package
    from tiny_models import BUILDERS, tiny

    out = {}
    for fam in sorted(BUILDERS):
        if FAMILIES[fam].no_fast_path is not None or (only and fam not in only):
            continue
        model, inputs = tiny(fam, batch=1)
        runner = AblationRunner(model, None, mean_like_baseline(model, inputs)).prepare(inputs=inputs)
        ad = runner.ad
        logits = runner(torch.zeros(1, ad.num_layers, ad.num_heads, dtype=torch.bool))[0]
        top = logits.topk(4).indices.tolist()
        timing = {k: 0.0 for k in ("single", "coar", "coar, other masks", *G.GRADIENT)}
        got = {k: v[None] for k, v in one_prompt(runner, top[0], top, masks, 0, timing).items()}
        out[fam] = {r["scores"] + " vs " + r["against"]: round(r["spearman_of_means"], 3) for r in table(got, PAIRS)}
        out[fam]["top10 recall atp* vs single"] = recall(got["atp*"][0], got["single"][0])
        print(fam, out[fam], flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=40)
    ap.add_argument("--masks", type=int, default=256, help="COAR's masks per image")
    ap.add_argument("--families", action="store_true", help="also every tiny family with the fast path")
    ap.add_argument("--only", default="", help="comma-separated families (with --families)")
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args()
    torch.set_num_threads(2)
    result = {}
    if not args.skip_default:
        rows, timing = default_model(args.n_images, args.masks)
        result["default"] = {"n_images": args.n_images, "rows": rows, "seconds_per_image": timing}
        print(f"default model, {args.n_images} easy-VQA shape questions, COAR at {args.masks} masks, grad-coar at 32")
        print(f"{'scores':<56} {'against':<8} {'rho(means)':>10} {'top10%':>7} {'rho/image':>10} {'top10%/image':>13}")
        for r in rows:
            print(f"{r['scores']:<56} {r['against']:<8} {r['spearman_of_means']:10.3f} {r['top10_recall_of_means']:7.2f} "
                  f"{r['spearman_per_image']:10.3f} {r['top10_recall_per_image']:13.2f}")
        print("seconds per image:", {k: round(v, 3) for k, v in timing.items()})
    if args.families:
        result["families"] = families([f for f in args.only.split(",") if f], args.masks)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
