"""The paper's yardstick for a head ranking, on held-out images:

- faithfulness(k) = (s(keep only the top-k heads) - s(ablate all)) / (s(clean) - s(ablate all)):
  how much of the answer comes back when the image flows only through the top-k heads;
- completeness(k) = (s(clean) - s(ablate the top-k heads)) / (s(clean) - s(ablate all)):
  how much of the answer goes when only the top-k heads are ablated;

per image, then a mean with a BCa interval over images, for every ranking (random rankings:
the mean of several draws, per image). "Heads needed": the smallest k at which a ranking's mean
curve reaches a level, with a paired percentile-bootstrap interval over images. Every mask of
every ranking and both curves for one image go through one batch (one prefix per image on the
fast path); masks shared between rankings (k = 0, k = all) are run once.
"""
from __future__ import annotations

import numpy as np
import torch

from headsteer.stats import bootstrap_ci_rows, paired_bootstrap

from .regression import statistic

LEVELS = (0.5, 0.8, 0.9)
CURVES = ("faithfulness", "completeness")


def k_grid(n_heads: int, k_max: int | None = None) -> list[int]:
    """k = 0..K (K = ``k_max`` or every head): each k up to 48 heads; above, each k up to 16 and
    then about 32 geometrically spaced values, K always included."""
    K = n_heads if k_max is None else max(1, min(int(k_max), n_heads))
    if K <= 48:
        return list(range(K + 1))
    tail = np.unique(np.round(np.geomspace(17, K, 32)).astype(int))
    return sorted(set(range(17)) | {int(t) for t in tail} | {K})


def random_rankings(L: int, H: int, n: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    heads = [(l, h) for l in range(L) for h in range(H)]
    return [[heads[i] for i in rng.permutation(L * H)] for _ in range(n)]


def curve_masks(rankings: dict, grid, L: int, H: int):
    """All masks of all rankings, both curves, deduplicated. Returns (masks [U, L, H] bool,
    keep_idx [R, G], ablate_idx [R, G]) indexing the unique masks; True = ablated."""
    R, G = len(rankings), len(grid)
    keep = torch.ones(R, G, L, H, dtype=torch.bool)
    abl = torch.zeros(R, G, L, H, dtype=torch.bool)
    for r, ranking in enumerate(rankings.values()):
        if len(ranking) < max(grid):
            raise ValueError(f"ranking {list(rankings)[r]!r} has {len(ranking)} heads; the grid goes to k = {max(grid)}")
        for g, k in enumerate(grid):
            for l, h in ranking[:k]:
                keep[r, g, l, h] = False
                abl[r, g, l, h] = True
    every = torch.cat([keep, abl]).view(-1, L, H)
    masks, inverse = torch.unique(every.view(len(every), -1), dim=0, return_inverse=True)
    inverse = inverse.view(2, R, G)
    return masks.view(-1, L, H), inverse[0].numpy(), inverse[1].numpy()


def measure(examples, rankings: dict, grid, L: int, H: int, logits_of, answer_id, stat="margin", candidates=None,
            progress=None) -> dict:
    """Raw per-image values. ``logits_of(i, masks)`` -> logits [M, vocab] of example i (one call
    per image: every mask of every ranking in one batch); ``answer_id(i)`` its answer token.
    Returns arrays: stat_keep / stat_ablate / acc_keep / acc_ablate [N, R, G], clean / none [N]
    (s of the clean model and with every head ablated)."""
    masks, ki, ai = curve_masks(rankings, grid, L, H)
    flat = masks.view(len(masks), -1)
    clean_i = int(torch.nonzero(~flat.any(1))[0])
    none_i = int(torch.nonzero(flat.all(1))[0])
    N, R, G = len(examples), len(rankings), len(grid)
    out = {k: np.zeros((N, R, G)) for k in ("stat_keep", "stat_ablate", "acc_keep", "acc_ablate")}
    out["clean"], out["none"] = np.zeros(N), np.zeros(N)
    out["acc_clean"], out["acc_none"] = np.zeros(N), np.zeros(N)
    for i in range(N):
        logits = logits_of(i, masks)
        aid = answer_id(i)
        s = statistic(logits, aid, stat, candidates).numpy().astype(np.float64)
        if candidates is not None and set(candidates) - {aid}:
            # closed vocabulary: the answer ranks first among the data set's answers
            ids = sorted(set(candidates) | {aid})
            correct = (torch.tensor(ids)[logits[:, ids].argmax(-1)] == aid).numpy().astype(np.float64)
        else:
            correct = (logits.argmax(-1) == aid).numpy().astype(np.float64)
        out["stat_keep"][i], out["stat_ablate"][i] = s[ki], s[ai]
        out["acc_keep"][i], out["acc_ablate"][i] = correct[ki], correct[ai]
        out["clean"][i], out["none"][i] = s[clean_i], s[none_i]
        out["acc_clean"][i], out["acc_none"][i] = correct[clean_i], correct[none_i]
        if progress is not None:
            progress(1)
    out["n_masks"] = len(masks)
    return out


def normalize(raw: dict, min_gap_frac: float = 0.1):
    """Per-image faithfulness and completeness [N, R, G]. An image is used only when its gap
    s(clean) - s(ablate all) is positive and at least ``min_gap_frac`` of the median positive
    gap (a ratio over a near-zero gap is noise); the guard and what it left out are returned."""
    gap = raw["clean"] - raw["none"]
    pos = gap[gap > 0]
    thr = float(min_gap_frac * np.median(pos)) if len(pos) else float("inf")
    used = (gap > 0) & (gap >= thr)
    d = gap[used][:, None, None]
    faith = (raw["stat_keep"][used] - raw["none"][used][:, None, None]) / d
    comp = (raw["clean"][used][:, None, None] - raw["stat_ablate"][used]) / d
    guard = {"gap": "s(clean) - s(all heads ablated), per image", "threshold": thr, "min_gap_frac": min_gap_frac,
             "n_images": int(len(gap)), "n_used": int(used.sum()), "excluded": [int(i) for i in np.flatnonzero(~used)],
             "gap_median": float(np.median(gap)) if len(gap) else float("nan"),
             "gap_min": float(gap.min()) if len(gap) else float("nan"),
             "gap_max": float(gap.max()) if len(gap) else float("nan")}
    return faith, comp, used, guard


def merge_random(values: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """[N, R, G] with rankings random#0.. -> the same with one 'random' ranking, the per-image
    mean over the draws."""
    rnd = [j for j, n in enumerate(names) if n.startswith("random#")]
    if not rnd:
        return values, names
    keep = [j for j in range(len(names)) if j not in rnd]
    merged = np.concatenate([values[:, keep], values[:, rnd].mean(1, keepdims=True)], axis=1)
    return merged, [names[j] for j in keep] + ["random"]


def _first_reached(means: np.ndarray, grid, level: float) -> np.ndarray:
    """[..., G] mean curves -> smallest k reaching ``level`` (NaN where none does)."""
    hit = means >= level - 1e-9
    first = np.where(hit.any(-1), hit.argmax(-1), -1)
    g = np.asarray(grid, dtype=np.float64)
    return np.where(first >= 0, g[np.maximum(first, 0)], np.nan)


def heads_needed(per_image: np.ndarray, grid, levels=LEVELS, n_boot: int = 1000, seed: int = 0) -> dict:
    """``per_image`` [N, R, G] (one curve) -> {level: {"k": [R], "low": [R], "high": [R],
    "reached_share": [R]}}: the smallest k whose mean over images reaches the level, and a
    percentile interval from resampling images (the same resamples for every ranking). NaN =
    not reached by the largest k; ``reached_share``: share of resamples that reach it."""
    out = {}
    point_means = per_image.mean(0)
    boots = paired_bootstrap(per_image, lambda m: np.stack([_first_reached(m, grid, lv) for lv in levels]),
                             n_boot=n_boot, seed=seed) if len(per_image) > 1 else None
    for j, lv in enumerate(levels):
        k = _first_reached(point_means, grid, lv)
        if boots is None:
            low, high, share = k, k, np.isfinite(k).astype(float)
        else:
            b = boots[:, j]  # [B, R]
            share = np.isfinite(b).mean(0)
            filled = np.where(np.isfinite(b), b, np.inf)
            low = np.percentile(filled, 2.5, axis=0, method="lower")
            high = np.percentile(filled, 97.5, axis=0, method="higher")
        out[lv] = {"k": k, "low": np.where(np.isfinite(low), low, np.nan), "high": np.where(np.isfinite(high), high, np.nan),
                   "reached_share": share}
    return out


def _num(x):
    x = float(x)
    return None if not np.isfinite(x) else (int(x) if x.is_integer() else round(x, 6))


def regimes(per: dict, names_m: list[str], rates: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    """Which rate's ranking serves keep-only (largest mean faithfulness over k) and which serves
    removal (largest mean completeness over k), with the paired bootstrap interval of the best
    rate's lead over the runner-up (over images)."""
    out = {}
    cols = [names_m.index(n) for n in rates]
    for regime, c in (("keep_only", "faithfulness"), ("removal", "completeness")):
        area = per[c][:, cols].mean(-1)  # [N, rates]: per-image mean over k
        means = area.mean(0)
        order = np.argsort(-means, kind="stable")
        names = list(rates)
        entry = {"alpha": rates[names[order[0]]], "curve": c,
                 "mean_over_k": {f"{rates[n]:g}": float(m) for n, m in zip(names, means)}}
        if len(order) > 1 and len(area) > 1:
            b, r = order[0], order[1]
            diffs = paired_bootstrap(area[:, [b]] - area[:, [r]], lambda m: m, n_boot=n_boot, seed=seed)[:, 0]
            lo, hi = np.percentile(diffs, [2.5, 97.5])
            entry.update(runner_up=rates[names[r]], lead=float(means[b] - means[r]), lead_low=float(lo), lead_high=float(hi),
                         clear=bool(lo > 0))
        out[regime] = entry
    return out


def summarize(raw: dict, names: list[str], grid, min_gap_frac: float = 0.1, n_boot: int = 1000, seed: int = 0,
              rates: dict | None = None) -> dict:
    """Mean curves with BCa intervals and heads needed, JSON-ready: {"k", "rankings": {name:
    {faithfulness: {mean, low, high}, completeness: ..., accuracy_keep, accuracy_ablate,
    stat_keep, stat_ablate}}, "heads_needed": {name: {curve: {level: {k, low, high}}}},
    "denominator": the guard, "clean": {...}, "all_ablated": {...}}; with ``rates`` (ranking
    name -> ablation rate, several) also "regimes" (see ``regimes``)."""
    faith, comp, used, guard = normalize(raw, min_gap_frac)
    faith, names_m = merge_random(faith, names)
    comp, _ = merge_random(comp, names)
    extra = {k: merge_random(raw[k], names)[0] for k in ("acc_keep", "acc_ablate", "stat_keep", "stat_ablate")}
    G = len(grid)
    res = {"k": list(grid), "denominator": guard, "rankings": {}, "heads_needed": {},
           "clean": {"stat": float(raw["clean"].mean()), "accuracy": float(raw["acc_clean"].mean())},
           "all_ablated": {"stat": float(raw["none"].mean()), "accuracy": float(raw["acc_none"].mean())}}
    per = {"faithfulness": faith, "completeness": comp}
    cis = {}
    for c, v in per.items():
        R = v.shape[1]
        if len(v):
            low, high = bootstrap_ci_rows(v.transpose(1, 2, 0).reshape(R * G, -1), n_boot=n_boot, seed=seed)
            cis[c] = (v.mean(0), low.reshape(R, G), high.reshape(R, G))
        else:
            nan = np.full((R, G), np.nan)
            cis[c] = (nan, nan, nan)
    needed = {c: heads_needed(v, grid, n_boot=n_boot, seed=seed) if len(v) else None for c, v in per.items()}
    if rates and len(rates) > 1 and len(faith):
        res["regimes"] = regimes(per, names_m, rates, n_boot=n_boot, seed=seed)
    for j, name in enumerate(names_m):
        entry = {}
        for c in CURVES:
            m, lo, hi = cis[c]
            entry[c] = {"mean": [_num(x) for x in m[j]], "low": [_num(x) for x in lo[j]], "high": [_num(x) for x in hi[j]]}
        for k, v in extra.items():
            key = k.replace("acc_", "accuracy_")
            entry[key] = [_num(x) for x in v[:, j].mean(0)]
        res["rankings"][name] = entry
        res["heads_needed"][name] = {
            c: {str(lv): ({"k": _num(d["k"][j]), "low": _num(d["low"][j]), "high": _num(d["high"][j]),
                           "reached_share": _num(d["reached_share"][j])} if d is not None else None)
                for lv, d in (needed[c] or {lv: None for lv in LEVELS}).items()}
            for c in CURVES}
    return res


def _fmt_needed(name, d, K):
    lo = d["low"] if d["low"] is not None else f">{K}"
    hi = d["high"] if d["high"] is not None else f">{K}"
    k = d["k"] if d["k"] is not None else f">{K}"
    return f"{name} {k} [{lo}, {hi}]"


def _separate(a, b) -> bool:
    """Interval of ``a`` entirely below that of ``b`` (an unreached high end is above every k)."""
    return a["high"] is not None and (b["low"] is None or a["high"] < b["low"])


def _versus(best, other, K) -> str:
    (_, bd), (on, od) = best, other
    if od["k"] is None:
        gap = f"while {_fmt_needed(on, od, K)} does not reach it by k = {K}"
    else:
        gap = f"{od['k'] - bd['k']} fewer than {_fmt_needed(on, od, K)}"
    return f"{gap} (95% intervals {'separate' if _separate(bd, od) else 'overlap'})"


def headline(curves: dict, level: float = 0.8) -> dict:
    """For each curve: which ranking needs fewest heads to reach ``level``, by how many fewer
    than the next ranking, whether their intervals separate; and the best attribution ranking
    against the best of the others (single-head, attention, random). {curve: sentence}."""
    out = {}
    lv = str(level)
    K = curves["k"][-1]
    for c in CURVES:
        rows = [(n, hn[c][lv]) for n, hn in curves["heads_needed"].items() if hn[c][lv] is not None]
        order = sorted(rows, key=lambda r: np.inf if r[1]["k"] is None else r[1]["k"])
        if not order or order[0][1]["k"] is None:
            out[c] = f"no ranking reaches {level:.0%} {c} by k = {K}."
            continue
        best = order[0]
        ties = [r for r in order if r[1]["k"] == best[1]["k"]]
        rest = [r for r in order if r[1]["k"] != best[1]["k"]]
        who = " and ".join(r[0] for r in ties)
        text = f"{who} need{'s' if len(ties) == 1 else ''} fewest heads for {level:.0%} {c}, {best[1]['k']}"
        text += f" ({'; '.join(_fmt_needed(n, d, K) for n, d in ties)})"
        text += f", {_versus(best, rest[0], K)}." if rest else " (every ranking needs as many)."
        attr = [r for r in order if r[0].startswith("attribution")]
        others = [r for r in order if not r[0].startswith("attribution")]
        if attr and others and not (len(ties) == 1 and best in attr and rest and rest[0] in others):
            a, o = attr[0], others[0]
            if a[1]["k"] is not None and (o[1]["k"] is None or a[1]["k"] < o[1]["k"]):
                text += f" Best attribution vs best other ranking: {a[0]} {a[1]['k']}, {_versus(a, o, K)}."
            elif a[1]["k"] is not None and a[1]["k"] == o[1]["k"]:
                text += f" Best attribution ({_fmt_needed(*a, K)}) needs as many as {_fmt_needed(*o, K)}."
            else:
                text += (f" Attribution does not need fewer: {_fmt_needed(*a, K)} against {_fmt_needed(*o, K)}"
                         f" (95% intervals {'separate' if _separate(o[1], a[1]) else 'overlap'}).")
        out[c] = text
    return out
