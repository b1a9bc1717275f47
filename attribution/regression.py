"""Attribution by regression (COAR): random ablation masks -> statistic -> linear model.

Plain arrays in and out, like scikit-learn: ``sample_masks`` gives bool [M, L, H], ``statistic``
turns logits into the measured value, ``fit`` returns per-head scores (sign flipped: larger =
ablating the head lowers the statistic more) and the held-out **linear-fit correlation** (Pearson /
Spearman between the fit's prediction and the measured statistic on masks it did not see). That
number says how well a linear model of the heads explains the statistic; it is not the paper's
*faithfulness*, which is the keep-only curve of ``curves.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from sklearn.linear_model import LassoCV, RidgeCV

from headsteer.errors import HeadsteerError

STATISTICS = ("logit", "margin")


def sample_masks(num_masks: int, num_layers: int, num_heads: int, alpha: float, seed: int = 0) -> torch.Tensor:
    """bool [M, L, H]; each head ablated independently with probability ``alpha``."""
    if not 0 < alpha < 1:
        raise HeadsteerError(f"alpha must be in (0, 1), the fraction of heads ablated per mask; got {alpha}")
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_masks, num_layers, num_heads, generator=g) < alpha


def statistic(logits: torch.Tensor, answer_id: int, kind: str = "logit", candidates=None) -> torch.Tensor:
    """[M] answer logit, or margin = answer logit - best other (among ``candidates`` ids if given
    and any besides the answer; otherwise among the whole vocabulary)."""
    if kind == "logit":
        return logits[:, answer_id]
    if kind != "margin":
        raise HeadsteerError(f"unknown statistic {kind!r}: use one of {', '.join(STATISTICS)}")
    other = logits.clone()
    if candidates is not None and set(candidates) - {answer_id}:  # else no other answer: the whole vocabulary
        keep = torch.zeros(other.shape[-1], dtype=torch.bool, device=other.device)
        keep[list(candidates)] = True
        other[:, ~keep] = float("-inf")
    other[:, answer_id] = float("-inf")
    return logits[:, answer_id] - other.max(-1).values


@dataclass
class Fit:
    scores: np.ndarray  # [L, H]; -coefficient: larger = more important
    intercept: float
    fit_pearson: float  # held-out linear-fit correlation
    fit_spearman: float
    penalty: float
    method: str
    holdout: np.ndarray  # indices of the masks held out for the linear-fit correlation

    @property
    def pearson(self) -> float:  # the name before the linear-fit correlation had its own
        return self.fit_pearson

    @property
    def spearman(self) -> float:
        return self.fit_spearman


def _constant(x) -> bool:
    return bool(np.ptp(x) <= 1e-12 * max(1.0, float(np.abs(x).max())))


def fit_correlation(predicted, measured) -> tuple[float, float]:
    """(Pearson, Spearman) between predicted and measured statistics (or any two score vectors); Spearman ranks ties by
    their average rank (scipy), so the answer does not depend on the order of the rows. NaN when
    either side is constant, where a correlation is undefined."""
    a, b = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if len(a) < 2 or _constant(a) or _constant(b):
        return float("nan"), float("nan")
    return float(stats.pearsonr(a, b).statistic), float(stats.spearmanr(a, b).statistic)


faithfulness = fit_correlation  # the old name; "faithfulness" now means the keep-only curve


def fit(masks: torch.Tensor, y: torch.Tensor, method: str = "ridge", holdout: float = 0.2, seed: int = 0) -> Fit:
    """Linear model mask -> statistic, penalty chosen by cross-validation on the training masks;
    the linear-fit correlation is measured on the held-out masks."""
    M, L, H = masks.shape
    X = masks.reshape(M, L * H).float().numpy()
    y = np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(M)
    n_test = max(2, int(round(holdout * M)))
    test, train = order[:n_test], order[n_test:]
    if method == "ridge":
        model = RidgeCV(alphas=np.logspace(-3, 3, 13))
    elif method == "lasso":
        model = LassoCV(cv=5, alphas=30, random_state=seed, max_iter=5000)
    else:
        raise HeadsteerError(f"unknown method {method!r}: use ridge or lasso")
    model.fit(X[train], y[train])
    pearson, spearman = fit_correlation(model.predict(X[test]), y[test])
    return Fit(
        scores=-model.coef_.reshape(L, H),
        intercept=float(model.intercept_),
        fit_pearson=pearson,
        fit_spearman=spearman,
        penalty=float(model.alpha_),
        method=method,
        holdout=test,
    )
