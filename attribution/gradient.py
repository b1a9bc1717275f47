"""Head attribution from gradients: every head's ablation effect estimated from one forward and one
backward pass (AtP, AtP*), or COAR's linear coefficients estimated from the gradients at a few random
masks (grad-coar), instead of hundreds of ablated forwards.

The variable differentiated is how far each query head is ablated, ``weight`` in [0, 1] (0 = clean,
1 = the paper's ablation: its text queries after the image read the baseline keys/values at the image
positions), on a path from the clean row to the ablated row (``headsteer.ablation.interpolate``). A
score is the estimated *drop* of the statistic when the head is ablated, as COAR's (larger = more
important):

- ``atp``: ``-d stat / d weight`` at the clean model, the keys/values each query head reads at the image
  moving linearly (path ``kv``): the first-order Taylor term of the exact ablation in the K/V a head
  reads, i.e. attribution patching with those K/V as the leaves (under GQA, per query head).
- ``atp*``: AtP* (Kramár et al. 2024) adapted to this ablation. QK fix: the head's attention pattern
  over the image moves between two exact softmaxes (path ``pattern``: d/dt = (A_b - A) V + A (V_b - V);
  the value part stays linear). GradDrop: one more backward pass per decoder layer l of the language
  model with the gradient through l's residual contribution dropped (all in one batched forward and
  backward); the magnitude is the paper's (1/(L-1)) sum_l |c_l| (a head's own layer gives 0, hence
  L - 1). Adaptation: the paper ranks by that magnitude; a head ranking by *drop* needs a sign, which
  is taken from the QK-fixed estimate without a drop (so a head whose ablation raises the statistic
  ranks low, as in COAR).
- ``grad-coar``: COAR's coefficient of a head at ablation rate alpha is the average effect of ablating
  it over random masks of that rate; it is estimated as minus the mean gradient over ``k`` random masks
  of that rate (path ``output``: the head's output moves linearly, so at a mask the gradient is the
  first-order effect of its output's exact change there). Interactions between heads enter through the
  masks, as in COAR.

    >>> import headsteer
    >>> from headsteer.ask import default_image
    >>> model, processor = headsteer.load("default")
    >>> s = gradient_scores(model, processor, default_image(), "what shape is in the image?", method="atp*")
    >>> tuple(s.shape), s.dtype
    ((4, 8), torch.float32)
"""
from __future__ import annotations

import numpy as np
import torch

from headsteer.errors import HeadsteerError

from . import regression
from .engine import AblationRunner
from .regression import fit_correlation, sample_masks

SCORERS = ("coar", "atp", "atp*", "grad-coar")
GRADIENT = ("atp", "atp*", "grad-coar")
PATH = {"atp": "kv", "atp*": "output", "grad-coar": "output"}
EXTRA = "atp*"  # the gradient ranking every run with comparisons adds as a cheap baseline


def gradient_refusal(ad) -> str | None:
    """Why the gradient scorers do not run on this model (None: they do)."""
    if ad.cross_attention:
        # IDEFICS's gated cross-attention blocks add to the residual stream outside the decoder layers, so
        # GradDrop's "a head's own layer gives 0" does not hold there; neither family was validated
        return (f"{ad.model_type} reads the image through cross-attention layers, where the gradient scorers are not "
                "validated against exact ablation; use --scorer coar")
    return None


def check_scorer(scorer: str, k: int = 32):
    if scorer not in SCORERS:
        raise HeadsteerError(f"unknown scorer {scorer!r}: use one of {', '.join(SCORERS)}")
    if scorer == "grad-coar" and k < 1:
        raise HeadsteerError(f"--grad-masks must be at least 1 (gradient passes per image for grad-coar); got {k}")


def atp(runner: AblationRunner, stat) -> tuple[torch.Tensor, dict]:
    """AtP: minus the gradient at the clean model along the K/V path. (scores [L, H], info)."""
    ad = runner.ad
    g, y = runner.gradients(torch.zeros(1, ad.num_layers, ad.num_heads), stat, PATH["atp"])
    return -g[0], {"clean": float(y[0]), "passes": 1}


def atp_star(runner: AblationRunner, stat) -> tuple[torch.Tensor, dict]:
    """AtP* with the QK fix and GradDrop (see the module's docstring). (scores [L, H], info)."""
    ad = runner.ad
    n = len(ad.language_model.layers)
    drops = torch.arange(-1, n)  # row 0: no drop; row 1 + l: layer l's residual contribution dropped
    g, y = runner.gradients(torch.zeros(n + 1, ad.num_layers, ad.num_heads), stat, PATH["atp*"], grad_drop=drops)
    c = -g
    if n < 2:  # one layer: nothing to drop but the heads' own
        return c[0], {"clean": float(y[0]), "passes": 1, "qk_fix": c[0]}
    magnitude = c[1:].abs().sum(0) / (n - 1)
    return torch.sign(c[0]) * magnitude, {"clean": float(y[0]), "passes": n + 1, "qk_fix": c[0]}


def grad_coar(runner: AblationRunner, stat, alpha: float, k: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """COAR's coefficients at rate ``alpha`` from the gradients at ``k`` random masks of that rate.
    (scores [L, H], info: also how well the gradient's linear model predicts the statistic at the k
    masks — not fitted to those values, only to their gradients)."""
    ad = runner.ad
    masks = sample_masks(k, ad.num_layers, ad.num_heads, alpha, seed).float()
    g, y = runner.gradients(masks, stat, PATH["grad-coar"])
    slope = g.mean(0)
    pearson, spearman = fit_correlation((masks * slope).sum((1, 2)).numpy(), y.numpy()) if k > 2 else (np.nan, np.nan)
    return -slope, {"passes": k, "fit_pearson": pearson, "fit_spearman": spearman, "masked_mean": float(y.mean())}


def score_heads(runner: AblationRunner, scorer: str, stat, alpha: float = 0.1, k: int = 32, seed: int = 0):
    """One prepared prompt's head scores by a gradient scorer: (float32 [L, H] on the host, info)."""
    check_scorer(scorer, k)
    why = gradient_refusal(runner.ad)
    if why is not None:
        raise HeadsteerError(f"--scorer {scorer}: {why}")
    if scorer == "atp":
        s, info = atp(runner, stat)
    elif scorer == "atp*":
        s, info = atp_star(runner, stat)
    elif scorer == "grad-coar":
        s, info = grad_coar(runner, stat, alpha, k, seed)
    else:
        raise HeadsteerError(f"{scorer!r} is not a gradient scorer: use one of {', '.join(GRADIENT)}")
    return s.float(), info


def gradient_scores(model, processor, image, question, baseline="mean", method: str = "atp*", statistic: str = "margin",
                    answer: str | None = None, alpha: float = 0.1, k: int = 32, seed: int = 0, candidates=None) -> torch.Tensor:
    """Head scores of one (image, question) from gradients: float32 [L, H] on the host, larger = more
    important (the estimated drop of the statistic when the head is ablated, as COAR's scores).

    ``method``: "atp", "atp*" or "grad-coar" (see the module's docstring); ``statistic``: "margin"
    (answer logit minus the best other among ``candidates`` token ids, or the whole vocabulary) or
    "logit"; ``answer``: the answer text (None: the clean model's top token); ``alpha``, ``k``, ``seed``:
    grad-coar's ablation rate, number of masks and their seed; ``baseline``: "mean", "blank", "zero" or
    a ``Baseline``."""
    check_scorer(method, k)
    if method == "coar":
        raise HeadsteerError("gradient_scores takes method atp, atp* or grad-coar; COAR runs in headsteer attribute")
    runner = AblationRunner(model, processor, baseline).prepare(image, question)
    ad = runner.ad
    if answer is None:
        aid = int(runner(torch.zeros(1, ad.num_layers, ad.num_heads, dtype=torch.bool))[0].argmax())
    else:
        aid = ad.answer_token_id(answer, question)
    cands = None if candidates is None else list(candidates)
    scores, _ = score_heads(runner, method, lambda logits: regression.statistic(logits, aid, statistic, cands), alpha, k, seed)
    return scores
