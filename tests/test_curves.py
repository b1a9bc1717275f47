"""Faithfulness / completeness curves, heads needed and regimes: a planted "model" (a stub logits
function whose image-carrying heads are known, redundant ones included) through the real
attribution and curve code, and every curve value checked against a direct computation — by hand
for the stub, by naive full forwards (one per mask) on the default model."""
import json
import types
from unittest import mock

import numpy as np
import pytest
import torch
from scipy import stats

import headsteer
from headsteer import HeadsteerError
from headsteer.attribution.curves import (curve_masks, headline, heads_needed, k_grid, measure, normalize,
                                          random_rankings, summarize)
from headsteer.attribution.engine import naive_logits
from headsteer.attribution.pipeline import layer_profile
from headsteer.attribution.run import Settings, aggregate, attribute_example, ranked_heads
from headsteer.baseline import make_baseline
from headsteer.data import load_easy_vqa
from headsteer.stats import bootstrap_ci, bootstrap_ci_rows

L, H = 2, 4
A1, A2, B = (1, 0), (1, 2), (0, 3)  # A1, A2 carry the image redundantly (either is enough); B adds a little
VOCAB, ANSWER, OTHER = 5, 1, 2


def planted_logits(masks, image_scale=1.0, jitter=None):
    """[M, vocab]: answer logit = 6 if A1 or A2 is kept, + 1 if B is kept (times image_scale);
    the best other answer is at 0. True = ablated."""
    masks = torch.as_tensor(masks).bool()
    kept = ~masks
    s = 6.0 * (kept[:, A1[0], A1[1]] | kept[:, A2[0], A2[1]]).float() + 1.0 * kept[:, B[0], B[1]].float()
    logits = torch.zeros(len(masks), VOCAB)
    logits[:, ANSWER] = image_scale * s + (0 if jitter is None else jitter)
    logits[:, OTHER] = 0.0
    logits[:, 0] = -1.0
    return logits


class StubRunner:
    def __init__(self, image_scale=1.0):
        self.ad = types.SimpleNamespace(num_layers=L, num_heads=H)
        self.scale = image_scale

    def __call__(self, masks, reduce=None):
        logits = planted_logits(masks, self.scale)
        return logits if reduce is None else reduce(logits)

    def attention_to_image(self):
        a = np.full((L, H), 0.5)
        a[B] = 1.0  # attention weight points at the weak head
        return a


def planted_rows(alphas, n=4):
    s = Settings(n_images=n, masks=300, alpha=alphas, statistic="margin")
    rows = []
    for i in range(n):
        # the stub is a boolean function of the masks, with no gradients: the atp* comparison ranking is
        # left out here (tests/test_gradient.py checks it on real models)
        with mock.patch("headsteer.attribution.run.extra_ranking", return_value=False):
            row = attribute_example(StubRunner(1.0 + 0.1 * i), ANSWER, s, seed=i, candidates=[ANSWER, OTHER])
        row["answer"] = "x"
        rows.append(row)
    return s, rows


def by_hand(ranking, k, scale=1.0):
    """faithfulness(k), completeness(k) of the planted function, computed directly."""
    def s(kept):
        return scale * (6.0 * (A1 in kept or A2 in kept) + 1.0 * (B in kept))

    every = {(l, h) for l in range(L) for h in range(H)}
    top = set(ranking[:k])
    clean, none = s(every), s(set())
    return (s(top) - none) / (clean - none), (clean - s(every - top)) / (clean - none)


def test_planted_heads_are_found_at_the_rate_of_their_regime():
    """Redundant heads (either one enough) are invisible one at a time and near the clean model
    (alpha 0.1 puts the weak head B first), and found at alpha 0.5: the regimes differ."""
    s, rows = planted_rows((0.1, 0.5))
    agg = aggregate(rows)
    top_low = ranked_heads(agg["rates"]["0.1"]["mean"])
    top_mid = ranked_heads(agg["rates"]["0.5"]["mean"])
    assert top_low[0] == B
    assert set(top_mid[:2]) == {A1, A2} and top_mid[2] == B
    assert ranked_heads(agg["single"])[0] == B  # single-head ablation cannot see redundant heads
    assert agg["single"][A1] == pytest.approx(0) and agg["single"][B] > 0.9

    rankings = {"attribution@0.1": top_low, "attribution@0.5": top_mid, "single-head": ranked_heads(agg["single"]),
                "attention": ranked_heads(agg["attention"])}
    grid = k_grid(L * H)
    scales = [1.0, 1.5, 2.0]
    raw = measure(scales, rankings, grid, L, H, lambda i, m: planted_logits(m, scales[i]), lambda i: ANSWER,
                  "margin", [ANSWER, OTHER])
    res = summarize(raw, list(rankings), grid, n_boot=200, rates={"attribution@0.1": 0.1, "attribution@0.5": 0.5})
    for name, ranking in rankings.items():
        for k in grid:
            f, c = by_hand(ranking, k)
            assert res["rankings"][name]["faithfulness"]["mean"][k] == pytest.approx(f, abs=1e-6), (name, k)
            assert res["rankings"][name]["completeness"]["mean"][k] == pytest.approx(c, abs=1e-6), (name, k)
    hn = res["heads_needed"]
    assert hn["attribution@0.5"]["faithfulness"]["0.8"]["k"] == 1  # keep A1: 6/7
    assert hn["attribution@0.5"]["completeness"]["0.8"]["k"] == 2  # ablate A1, A2: 6/7
    assert hn["attribution@0.1"]["completeness"]["0.8"]["k"] == 3
    assert hn["attribution@0.1"]["faithfulness"]["0.8"]["k"] >= 2
    assert hn["attribution@0.5"]["faithfulness"]["0.9"]["k"] == 3  # 6/7 until B is kept too
    assert hn["attribution@0.5"]["faithfulness"]["0.5"]["k"] == 1
    g = res["regimes"]
    assert g["keep_only"]["alpha"] == 0.5 and g["removal"]["alpha"] == 0.5
    assert g["keep_only"]["runner_up"] == 0.1 and g["keep_only"]["lead"] > 0
    h = headline(res)
    assert h["faithfulness"].startswith("attribution@0.5 needs fewest heads for 80% faithfulness, 1")
    prof = layer_profile(agg["rates"]["0.5"]["mean"], top_frac=0.25)
    assert prof["count_per_layer"] == [0, 2] and sum(prof["mass_per_layer"]) == pytest.approx(1)


def test_curve_masks_dedupe_and_index_every_ranking():
    rankings = {"a": ranked_heads(np.arange(8.0).reshape(2, 4)), "b": random_rankings(2, 4, 1, seed=3)[0]}
    grid = [0, 1, 3, 8]
    masks, ki, ai = curve_masks(rankings, grid, 2, 4)
    assert len({tuple(m.view(-1).tolist()) for m in masks}) == len(masks)  # unique
    for r, ranking in enumerate(rankings.values()):
        for g, k in enumerate(grid):
            want = torch.zeros(2, 4, dtype=torch.bool)
            for l, h in ranking[:k]:
                want[l, h] = True
            assert torch.equal(masks[ai[r, g]], want) and torch.equal(masks[ki[r, g]], ~want)
    # k = 0 and k = all are shared by both rankings: 2 + 2 * 2 * 2 masks, not 16
    assert len(masks) == 2 + 2 * 2 * 2
    assert k_grid(32) == list(range(33)) and k_grid(32, 5) == list(range(6))
    big = k_grid(1024)
    assert big[:17] == list(range(17)) and big[-1] == 1024 and len(big) < 60


def test_denominator_guard_leaves_out_tiny_gaps_and_says_so():
    raw = {"clean": np.array([5.0, 4.0, 0.01, 3.0]), "none": np.array([1.0, 1.0, 0.0, 4.0]),
           "stat_keep": np.zeros((4, 1, 2)), "stat_ablate": np.zeros((4, 1, 2))}
    raw["stat_keep"][:, 0, 1] = raw["clean"]
    raw["stat_keep"][:, 0, 0] = raw["none"]
    raw["stat_ablate"][:, 0, 0] = raw["clean"]
    raw["stat_ablate"][:, 0, 1] = raw["none"]
    faith, comp, used, guard = normalize(raw, 0.1)
    assert used.tolist() == [True, True, False, False]  # gap 0.01 < 10% of median 3.5; gap -1 < 0
    assert guard["excluded"] == [2, 3] and guard["n_used"] == 2
    assert faith[:, 0].tolist() == [[0, 1], [0, 1]] and comp[:, 0].tolist() == [[0, 1], [0, 1]]


def test_heads_needed_interval_brackets_the_point_and_separates_distinct_rankings():
    rng = np.random.default_rng(0)
    grid = list(range(9))
    base = np.clip(np.array(grid) / 4, 0, 1)  # reaches 0.8 at k = 4 (3.2 / 4)
    slow = np.clip(np.array(grid) / 8, 0, 1)  # at k = 7
    per = np.stack([np.stack([base, slow]) + rng.normal(0, 0.02, (2, 9)) for _ in range(30)])
    d = heads_needed(per, grid, levels=(0.8,), n_boot=300)[0.8]
    assert d["k"].tolist() == [4, 7]
    assert d["low"][0] <= 4 <= d["high"][0] and d["high"][0] < d["low"][1]
    exact = np.tile(np.array([0, 0.5, 0.8, 0.9, 1.0]), (5, 1, 1))  # a level met exactly counts as reached
    assert heads_needed(exact, [0, 1, 2, 3, 4], levels=(0.8, 0.9), n_boot=50)[0.8]["k"].tolist() == [2]
    never = heads_needed(per * 0.5, grid, levels=(0.8,), n_boot=100)[0.8]
    assert np.isnan(never["k"]).all() and (never["reached_share"] == 0).all()


def test_bootstrap_rows_match_one_at_a_time_and_scipy():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(3, 25))
    m[1] = 2.0  # constant row
    low, high = bootstrap_ci_rows(m, n_boot=500, seed=0)
    assert (low[1], high[1]) == (2.0, 2.0)
    ref = stats.bootstrap((m[0],), np.mean, n_resamples=500, method="BCa", rng=np.random.default_rng(0), vectorized=True)
    one = bootstrap_ci(m[0], n_boot=500, seed=0)
    assert low[0] == pytest.approx(one[0], abs=0.03) and high[0] == pytest.approx(one[1], abs=0.03)
    assert one == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))


def test_curves_on_the_default_model_equal_naive_forwards(default_model):
    """The batched, deduplicated fast-path curves against one full forward per mask."""
    model, proc = default_model
    ad = headsteer.get_adapter(model, proc)
    exs = load_easy_vqa("test", limit=2, qtypes=("shape",))
    base = make_baseline(model, proc, "zero")
    rankings = {"r0": random_rankings(4, 8, 1, seed=5)[0], "r1": random_rankings(4, 8, 1, seed=6)[0]}
    grid = [0, 1, 2, 5]  # k_max 5: clean and all-ablated masks still come from k = 0
    cands = sorted({ad.answer_token_id(a) for a in ("circle", "rectangle", "triangle")})
    from headsteer.attribution import AblationRunner

    raw = measure(exs, rankings, grid, 4, 8, lambda i, m: AblationRunner(model, proc, base).prepare(exs[i]["image"], exs[i]["question"])(m),
                  lambda i: ad.answer_token_id(exs[i]["answer"]), "margin", cands)
    res = summarize(raw, list(rankings), grid, n_boot=100)
    from headsteer.attribution.regression import statistic

    for i, ex in enumerate(exs):
        inputs = ad.encode([ex["image"]], [ex["question"]])
        aid = ad.answer_token_id(ex["answer"])
        every = torch.ones(1, 4, 8, dtype=torch.bool)
        s_clean, s_none = statistic(naive_logits(model, proc, inputs, ~every, base), aid, "margin", cands).tolist()[0], \
            statistic(naive_logits(model, proc, inputs, every, base), aid, "margin", cands).tolist()[0]
        assert raw["clean"][i] == pytest.approx(s_clean, abs=1e-3) and raw["none"][i] == pytest.approx(s_none, abs=1e-3)
        for r, ranking in enumerate(rankings.values()):
            for g, k in ((1, 1), (3, 5)):
                m = torch.zeros(1, 4, 8, dtype=torch.bool)
                for l, h in ranking[:k]:
                    m[0, l, h] = True
                keep = statistic(naive_logits(model, proc, inputs, ~m, base), aid, "margin", cands).item()
                abl = statistic(naive_logits(model, proc, inputs, m, base), aid, "margin", cands).item()
                assert raw["stat_keep"][i, r, g] == pytest.approx(keep, abs=1e-3)
                assert raw["stat_ablate"][i, r, g] == pytest.approx(abl, abs=1e-3)
    gap = raw["clean"] - raw["none"]
    f = (raw["stat_keep"][:, 0, 3] - raw["none"]) / gap
    assert res["rankings"]["r0"]["faithfulness"]["mean"][3] == pytest.approx(f.mean(), abs=1e-6)
    c = (raw["clean"] - raw["stat_ablate"][:, 1, 2]) / gap
    assert res["rankings"]["r1"]["completeness"]["mean"][2] == pytest.approx(c.mean(), abs=1e-6)


def test_bad_rates_are_one_line_errors():
    for bad in ("0", "0.1,1.0", "0.1,0.1", "abc", ""):
        with pytest.raises(HeadsteerError, match="--alpha takes"):
            Settings(alpha=bad)
    assert Settings(alpha="0.1").alpha == 0.1 and Settings(alpha="0.1,0.5").rates == (0.1, 0.5)
    assert json.dumps(Settings(alpha="0.5,0.1").__dict__)  # identity-serialisable
