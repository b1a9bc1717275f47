"""A whole attribution study over a data set: per-image regression (written as it goes, so an
interrupted run resumes), the paper's baselines (single-head ablation, attention weight), and
aggregation over images and classes."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch

from headsteer.adapters import get_adapter
from headsteer.baseline import as_baseline
from headsteer.errors import HeadsteerError
from headsteer.parallel import gather_rows, process_shard
from headsteer.rows import resume_rows
from headsteer.rundir import open_run, record, run_identity
from headsteer.selfcheck import SKIPPED, check_example

from .engine import AblationRunner
from .gradient import EXTRA, Readout, check_scorer, gradient_refusal, score_heads
from .regression import STATISTICS, fit, sample_masks, statistic


@dataclass
class Settings:
    """What determines an attribution's numbers (all of it goes into the run's identity).
    ``alpha``: the ablation rate, or several (a tuple): one regression per rate per image, on
    ``masks`` masks each; the first rate is the primary ranking (``heads.json["heads"]``). ``scorer``:
    what makes the ranking — "coar" (the regression), "atp", "atp*" (gradient estimates of single-head
    ablation at the clean model: no rate) or "grad-coar" (COAR's coefficients from the gradients at
    ``grad_masks`` random masks per rate); see attribution/gradient.py."""

    n_images: int = 40
    masks: int = 256
    alpha: float | tuple = 0.1
    baseline: str = "mean"
    statistic: str = "margin"
    method: str = "ridge"
    seed: int = 0
    compare: bool = True  # single-head ablation and attention-weight scores too
    n_random: int = 3  # random rankings in the curves
    scorer: str = "coar"
    grad_masks: int = 32

    def __post_init__(self):
        check_scorer(self.scorer, self.grad_masks)
        rates = parse_rates(self.alpha)
        if self.scorer in ("atp", "atp*") and len(rates) > 1:
            raise HeadsteerError(f"--scorer {self.scorer} estimates each head's effect from the clean model and has no ablation "
                                 "rate: give one --alpha (coar and grad-coar fit one ranking per rate)")
        self.alpha = rates[0] if len(rates) == 1 else rates  # one rate: a float, as in runs before rates
        if self.masks < 4:
            raise HeadsteerError(f"--masks must be at least 4 (masks per image and rate: the regression holds 2 out); got {self.masks}")
        if self.n_random < 0:
            raise HeadsteerError(f"--n-random must be 0 or more; got {self.n_random}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise HeadsteerError(f"--seed must be a whole number from 0 to 2**32 - 1; got {self.seed!r}")
        if self.statistic not in STATISTICS:
            raise HeadsteerError(f"unknown statistic {self.statistic!r}: use one of {', '.join(STATISTICS)}")

    @property
    def rates(self) -> tuple[float, ...]:
        return parse_rates(self.alpha)


def parse_rates(alpha) -> tuple[float, ...]:
    """``0.1``, ``"0.1,0.5,0.9"`` or a sequence -> a tuple of distinct rates in (0, 1)."""
    items = alpha.split(",") if isinstance(alpha, str) else (alpha if isinstance(alpha, (list, tuple)) else [alpha])
    try:
        rates = tuple(float(a) for a in items)
    except (TypeError, ValueError):
        raise HeadsteerError(f"--alpha takes ablation rates in (0, 1), comma-separated, e.g. 0.1,0.5,0.9; got {alpha!r}") from None
    if not rates or any(not 0 < a < 1 for a in rates) or len(set(rates)) != len(rates):
        raise HeadsteerError(f"--alpha takes distinct ablation rates in (0, 1), comma-separated, e.g. 0.1,0.5,0.9; got {alpha!r}")
    return rates


def rate_key(alpha: float) -> str:
    return f"{alpha:g}"


# what ``headsteer attribute`` writes in its folder (the only files --force deletes)
OUTPUTS = ("per_image.jsonl", "scores.safetensors", "heads.json", "heatmap.png", "topk_curve.png", "layers.png",
           "summary.md", "report.html")


def outputs(world: int) -> list[str]:
    return [*OUTPUTS, *(f"per_image.rank{r}.jsonl" for r in range(world) if world > 1)]


def candidate_ids(ad, answers) -> list[int]:
    return sorted({ad.answer_token_id(a) for a in answers})


def answer_candidates(ad, dataset) -> list[int]:
    """First tokens of every answer in the data set: the margin's "best other answer" and the
    closed-vocabulary accuracy of the curves range over these."""
    return candidate_ids(ad, sorted(set(dataset["answer"])))


log = logging.getLogger("headsteer")


def attribute_example(runner: AblationRunner, answer_id: int, s: Settings, seed: int, candidates=None) -> dict:
    """One image (a prepared runner): the scorer's ranking per ablation rate — a regression (the masks
    of every rate share one uniform draw, thresholded at each rate) or a gradient scorer —, single-head
    ablation and attention weights (all masks in one batch) and, with them, the atp* ranking as a cheap
    extra baseline (``extra_ranking``)."""
    ad = runner.ad
    L, H = ad.num_layers, ad.num_heads
    rates = s.rates
    per_rate = [sample_masks(s.masks, L, H, a, seed) for a in rates] if s.scorer == "coar" else []
    none = torch.zeros(1, L, H, dtype=torch.bool)
    single = torch.eye(L * H, dtype=torch.bool).view(L * H, L, H) if s.compare else none[:0]
    def reduce(logits):  # on the device: the statistic, and whether the answer is the argmax
        return torch.stack([statistic(logits, answer_id, s.statistic, candidates),
                            (logits.argmax(-1) == answer_id).float()], -1)

    out = runner(torch.cat([none, *per_rate, single]), reduce)
    stats, correct = out[:, 0], bool(out[0, 1])
    clean = float(stats[0])
    fits = {}
    for j, (a, masks) in enumerate(zip(rates, per_rate)):
        y = stats[1 + j * s.masks : 1 + (j + 1) * s.masks]
        f = fit(masks, y, s.method, seed=seed)
        fits[rate_key(a)] = {"scores": f.scores.round(6).tolist(), "intercept": f.intercept, "fit_pearson": f.fit_pearson,
                             "fit_spearman": f.fit_spearman, "penalty": f.penalty, "masked_mean": float(y.mean())}
    readout = Readout(answer_id, s.statistic, candidates)
    if s.scorer != "coar":
        for a in rates:
            scores, info = score_heads(runner, s.scorer, readout, a, s.grad_masks, seed)
            fits[rate_key(a)] = {"scores": scores.numpy().round(6).tolist(), "intercept": float("nan"),
                                 "fit_pearson": info.get("fit_pearson", float("nan")),
                                 "fit_spearman": info.get("fit_spearman", float("nan")), "penalty": float("nan"),
                                 "masked_mean": info.get("masked_mean", float("nan"))}
    first = fits[rate_key(rates[0])]
    row = {**first, "clean": clean, "correct": correct, "rates": fits}
    if s.compare:
        st = stats[1 + len(per_rate) * s.masks :]
        row["single"] = (clean - st).view(L, H).numpy().round(6).tolist()
        row["attention"] = runner.attention_to_image().round(6).tolist()
        if extra_ranking(s, ad):
            try:
                extra = score_heads(runner, EXTRA, readout)[0]
                row[EXTRA] = extra.numpy().round(6).tolist()
            except HeadsteerError as e:  # e.g. an fp16 backward that overflows: the run goes on without this baseline
                log.warning("the %s comparison ranking is left out for this image: %s", EXTRA, e)
    return row


def extra_ranking(s: Settings, ad) -> bool:
    """Whether a run adds the atp* ranking to its comparisons: with --compare, where the scorer is not
    atp* itself and the gradient scorers run on this model. It costs one batched forward and backward
    over the text suffix per image (docs/benchmarks.md), next to the scorer's masks and the single-head
    ablations the comparisons run anyway."""
    return s.compare and s.scorer != EXTRA and gradient_refusal(ad) is None


def self_check(model, processor, example: dict, baseline, settings: Settings) -> dict:
    """The run's engine check on its first example (``headsteer.selfcheck``): identity, and fast ==
    naive where the fast path would run. ``fast`` in the result: whether the run may use the fast path
    (a failed fast check falls back to the naive path, with one line saying so)."""
    runner = AblationRunner(model, processor, baseline)

    def fast_check(inputs):
        failed = runner.prepare_checked(inputs)
        if failed is not None:
            return lambda floor: dict(failed, masks=0)
        return lambda floor: runner.check_fast_path(floor, settings.rates[0], seed=settings.seed)

    check = check_example(model, processor, example, fast_check=fast_check)
    fast = (check.get("fast_vs_naive") or {}).get("passed", True)
    if not fast:
        f = check["fast_vs_naive"]
        why = f.get("error") or f"max |diff| {f['max_abs_diff']:.3g} > tolerance {f['tolerance']:.3g}"
        log.warning("self-check: the fast path differs from the naive path on %s with transformers %s (%s); this run uses "
                    "the naive path (same numbers, slower)", check["family"], check["transformers"], why)
    check["fast"] = fast
    return check


def run_attribution(model, processor, dataset, settings: Settings, out_dir, progress=None, force: bool = False,
                    data_spec: dict | None = None, check: dict | bool = True) -> list[dict]:
    """Per-image attribution of ``dataset`` rows 0..n_images-1; rows are appended to
    ``out_dir/per_image.jsonl`` as they finish, and a rerun of the same identity (weights,
    processor, data rows, dtype, settings, baseline: see ``headsteer.rundir``) resumes; a folder of
    another identity is refused unless ``force``. ``data_spec``: what else identifies the data
    (kept in run.json). Under ``accelerate launch`` each process takes every world-th image and
    all rows are gathered. ``check``: the run's self-check (``self_check``) done before (a dict), to do
    here (True) or skipped (False, ``--no-self-check``); its figures go to run.json."""
    ad = get_adapter(model, processor)
    rank, world = process_shard()
    n = min(settings.n_images, len(dataset))
    base = as_baseline(model, processor, settings.baseline, dataset)
    ident, info = run_identity("attribute", model, processor, dataset, n, data_spec, asdict(settings), baseline=base)
    if check is True:
        check = self_check(model, processor, dataset[0], base, settings) if len(dataset) else dict(SKIPPED, fast=True)
    elif check is False:
        check = dict(SKIPPED, fast=True)
    run = open_run(out_dir, ident, force=force, outputs=outputs(world), info=info)
    record(run, "self_check", check)
    rows_path = run / (f"per_image.rank{rank}.jsonl" if world > 1 else "per_image.jsonl")
    rows = resume_rows(rows_path)
    cands = answer_candidates(ad, dataset) if settings.statistic == "margin" else None
    todo = [i for i in range(rank, n, world) if i not in rows]
    with open(rows_path, "a") as f:
        for i in todo:
            ex = dataset[i]
            runner = AblationRunner(model, processor, base, fast=None if check["fast"] else False)
            runner.prepare(ex["image"], ex["question"])
            answer_id = ad.answer_token_id(ex["answer"], ex["question"])
            row = attribute_example(runner, answer_id, settings, settings.seed * 100003 + i, cands)
            row.update(index=i, question=ex["question"], answer=ex["answer"], qtype=ex.get("qtype"),
                       image_id=ex.get("image_id"))
            f.write(json.dumps(row) + "\n")
            f.flush()
            rows[i] = row
            if progress is not None:
                progress(1)
    return gather_rows([rows[i] for i in range(rank, n, world)])


def _fit_corr(r: dict, which: str) -> float:
    # rows written before the linear-fit correlation had its own name call it pearson/spearman
    return r.get(f"fit_{which}", r.get(which, float("nan")))


def _nanmean(values) -> float:
    """Mean of the finite values; NaN (without numpy's warning) where there is none — atp and atp* fit no
    linear model, so their rows carry no linear-fit correlation."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def _score_stats(S: np.ndarray, top_k: int) -> dict:
    N, L, H = S.shape
    top = np.argsort(-S.reshape(N, -1), axis=1)[:, :top_k]
    freq = np.zeros(L * H)
    for t in top:
        freq[t] += 1
    return {"mean": S.mean(0), "stderr": S.std(0, ddof=1) / np.sqrt(N) if N > 1 else np.zeros((L, H)),
            "topk_freq": (freq / N).reshape(L, H)}


def aggregate(rows: list[dict], top_k: int = 5) -> dict:
    """Mean score, standard error and top-k frequency per head (primary rate, and per rate in
    ``rates``); per-class means; the held-out linear-fit correlation."""
    S = np.array([r["scores"] for r in rows])  # [N, L, H]
    N, L, H = S.shape
    agg = {
        **_score_stats(S, top_k),
        "fit_pearson": _nanmean([_fit_corr(r, "pearson") for r in rows]),
        "fit_spearman": _nanmean([_fit_corr(r, "spearman") for r in rows]),
        "n_images": N,
        "clean_accuracy": float(np.mean([r["correct"] for r in rows])),
        "per_class": {},
    }
    for cls in sorted({r["answer"] for r in rows}):
        agg["per_class"][cls] = np.array([r["scores"] for r in rows if r["answer"] == cls]).mean(0)
    agg["rates"] = {}
    for key in rows[0].get("rates", {}):
        Sr = np.array([r["rates"][key]["scores"] for r in rows])
        agg["rates"][key] = {**_score_stats(Sr, top_k), "per_image": Sr,
                             "fit_pearson": _nanmean([r["rates"][key]["fit_pearson"] for r in rows]),
                             "fit_spearman": _nanmean([r["rates"][key]["fit_spearman"] for r in rows])}
    if all(EXTRA in r for r in rows):  # a comparison ranking only where every image has it
        agg[EXTRA] = np.array([r[EXTRA] for r in rows]).mean(0)
    if "single" in rows[0]:
        agg["single"] = np.array([r["single"] for r in rows]).mean(0)
        agg["attention"] = np.array([r["attention"] for r in rows]).mean(0)
        agg["attention_per_image"] = np.array([r["attention"] for r in rows])
    return agg


def ranked_heads(scores: np.ndarray) -> list[tuple[int, int]]:
    L, H = scores.shape
    order = np.argsort(-scores.reshape(-1), kind="stable")
    return [(int(i // H), int(i % H)) for i in order]
