"""Head attribution from gradients: every head's ablation effect estimated from one forward and one
backward pass (AtP, AtP*), or COAR's linear coefficients estimated from the gradients at a few random
masks (grad-coar), instead of hundreds of ablated forwards.

The variable differentiated is how far each query head is ablated, ``weight`` in [0, 1] (0 = clean,
1 = the paper's ablation: its text queries after the image read the baseline keys/values at the image
positions), on a path from the clean row to the ablated row (``headsteer.ablation.interpolate``; both
ends exact). A score is the estimated *drop* of the statistic when the head is ablated, as COAR's
(larger = more important). Gradients flow through the text suffix only (the fast path's shared prefix
holds no graph); the naive path runs a full forward and backward per row.

- ``atp``: ``-d stat / d weight`` at the clean model with the keys and values each query head reads at
  the image moving linearly (path ``kv``): the first-order Taylor term of the exact ablation in those
  K/V — attribution patching with them as the leaves, per query head under GQA.
- ``atp*``: AtP* (Kramár et al. 2024) adapted to this ablation, three changes to ``atp``:
  QK fix — the paper recomputes the attention softmax exactly for patched keys and keeps the value
  part linear, for keys and values patched as separate nodes. Here a head's keys and values are
  ablated together, and with the exact softmax against the baseline keys the head's ablated output
  A_b V_b costs no more than the linear value part, so the head's output moves to its exact ablated
  value (path ``output``; the separate-node version, (A_b - A) V + A (V_b - V), is path ``pattern``).
  GradDrop — one more backward pass per decoder layer l of the language model with the gradient
  through l's residual contribution dropped (batched: L + 1 rows of one forward), the paper's
  magnitude (1/(L-1)) sum_l |c_l| (a head's own layer gives 0, hence L - 1); the paper ranks by that
  magnitude, a ranking by *drop* needs a sign, taken from the estimate without a drop.
  Exact readout — the margin's max over the other answers is a kink that no first-order term sees
  (a head's ablation can change which answer is the runner-up). The logit differences to the
  ``RIVALS`` closest other answers are estimated linearly (one backward pass each) and the statistic
  is read from them exactly (for the answer logit this is the plain gradient).
- ``grad-coar``: COAR's coefficient of a head at ablation rate alpha is the average effect of ablating
  it over random masks of that rate, f(head at 1) - f(head at 0) = the integral of its derivative from
  0 to 1. It is estimated from the gradients (path ``output``) at ``k`` random masks of that rate by the
  trapezoid rule: half the mean derivative over the masks where the head is clean plus half over those
  where it is ablated (exact for a statistic quadratic in the head's weight), so the interactions
  between heads that COAR sees at its operating point enter through the masks. The plain mean of the
  gradients would weigh the clean end by 1 - alpha and miss the curvature along the ablation (on the
  default model: Spearman with COAR's mean ranking 0.80 against 0.97, docs/results.md). A head that
  no mask ablates (or every mask does) falls back to its mean derivative.
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
RIVALS = 2  # the other answers whose logits atp* follows (the clean model's closest), one backward pass each


class Readout:
    """The statistic of ``headsteer attribute`` (``regression.statistic``) — the answer's logit, or its
    margin over the best other answer (among ``candidates`` token ids, or the whole vocabulary) — and,
    for atp*, the same statistic read from a few linearly estimated logit differences."""

    def __init__(self, answer_id: int, kind: str = "margin", candidates=None):
        if kind not in regression.STATISTICS:
            raise HeadsteerError(f"unknown statistic {kind!r}: use one of {', '.join(regression.STATISTICS)}")
        self.answer_id, self.kind = int(answer_id), kind
        self.candidates = None if candidates is None else sorted({int(c) for c in candidates})

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """[m, vocab] -> the statistic [m]."""
        return regression.statistic(logits, self.answer_id, self.kind, self.candidates)

    def rivals(self, clean: torch.Tensor) -> list[int]:
        """The other answers the margin's max is most likely to pick after one ablation: the ``RIVALS``
        highest at the clean logits ``clean`` [vocab] (among the candidates, else the vocabulary)."""
        keep = [c for c in (self.candidates or ()) if c != self.answer_id]
        if keep:
            others = torch.full_like(clean, float("-inf"))
            others[keep] = clean[keep]
        else:  # no other candidate: the whole vocabulary, as the statistic itself
            others = clean.clone()
        others[self.answer_id] = float("-inf")
        return others.topk(min(RIVALS, int(torch.isfinite(others).sum()))).indices.tolist()

    def parts(self):
        """The quantities a linear estimate is made of, [m, vocab] -> [m, P]: the answer's logit, or its
        difference to each rival — chosen from the first clean row it sees and kept, so that every batch
        of one call differentiates the same parts (and no extra forward is spent on choosing them)."""
        a, rivals = self.answer_id, []

        def parts(logits):
            if self.kind == "logit":
                return logits[:, [a]]
            if not rivals:
                rivals.extend(self.rivals(logits[0].detach()))
            return logits[:, [a]] - logits[:, rivals]

        return parts

    def of_parts(self, parts: torch.Tensor) -> torch.Tensor:
        """The statistic from [..., P] parts: the logit, or the smallest difference (the max over rivals)."""
        return parts[..., 0] if self.kind == "logit" else parts.min(-1).values


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
    if k < 1:
        raise HeadsteerError(f"--grad-masks must be at least 1 (gradient passes per image for grad-coar); got {k}")


def atp(runner: AblationRunner, readout: Readout) -> tuple[torch.Tensor, dict]:
    """AtP: minus the gradient of the statistic at the clean model along the K/V path. (scores [L, H], info)."""
    ad = runner.ad
    g, y = runner.gradients(torch.zeros(1, ad.num_layers, ad.num_heads), readout, PATH["atp"])
    return -g[0], {"clean": float(y[0]), "passes": 1}


def atp_star(runner: AblationRunner, readout: Readout, grad_drop: bool = True, path: str = PATH["atp*"],
             exact_readout: bool = True) -> tuple[torch.Tensor, dict]:
    """AtP* as adapted here (see the module's docstring): each head's output changes exactly, GradDrop
    over the decoder layers, the statistic read exactly from linearly estimated logit differences.
    ``grad_drop``, ``path`` and ``exact_readout`` switch the parts off for comparison (the validation's
    variants). (scores [L, H], info)."""
    ad = runner.ad
    n = len(ad.language_model.layers)
    # row 0: no drop; row 1 + l: the gradient through layer l's residual contribution dropped
    drops = torch.arange(-1, n) if grad_drop and n > 1 else torch.tensor([-1])
    zeros = torch.zeros(len(drops), ad.num_layers, ad.num_heads)
    if exact_readout:  # every row is the clean model (weights 0): its parts are the clean ones
        g, y = runner.gradients(zeros, readout.parts(), path, grad_drop=drops)  # [R, P, L, H], [R, P]
        est = readout.of_parts(y[0]) - readout.of_parts(y[0] + g.movedim(1, -1))  # drop of the statistic, [R, L, H]
        passes = len(drops) * g.shape[1]
    else:
        g, _ = runner.gradients(zeros, readout, path, grad_drop=drops)
        est, passes = -g, len(drops)
    info = {"passes": passes, "no_drop": est[0]}
    if len(drops) == 1:
        return est[0], info
    # the paper's (1/(L-1)) sum_l |c_l|: a head's own layer gives 0; signed by the estimate without a drop
    return torch.sign(est[0]) * est[1:].abs().sum(0) / (n - 1), info


def grad_coar(runner: AblationRunner, readout, alpha: float, k: int, seed: int = 0,
              trapezoid: bool = True) -> tuple[torch.Tensor, dict]:
    """COAR's coefficients at rate ``alpha`` from the gradients at ``k`` random masks of that rate.
    (scores [L, H], info: also how well the gradient's linear model predicts the statistic at the k
    masks — not fitted to those values, only to their gradients). ``trapezoid=False``: the plain mean
    of the gradients (measured beside it in scripts/validate_gradient.py)."""
    ad = runner.ad
    masks = sample_masks(k, ad.num_layers, ad.num_heads, alpha, seed).float()
    g, y = runner.gradients(masks, readout, PATH["grad-coar"])
    on, off = masks.sum(0), (1 - masks).sum(0)
    ends = ((g * (1 - masks)).sum(0) / off.clamp(min=1) + (g * masks).sum(0) / on.clamp(min=1)) / 2  # trapezoid
    slope = torch.where((on > 0) & (off > 0), ends, g.mean(0)) if trapezoid else g.mean(0)
    pearson, spearman = fit_correlation((masks * slope).sum((1, 2)).numpy(), y.numpy()) if k > 2 else (np.nan, np.nan)
    return -slope, {"passes": k, "fit_pearson": pearson, "fit_spearman": spearman, "masked_mean": float(y.mean())}


def score_heads(runner: AblationRunner, scorer: str, readout: Readout, alpha: float = 0.1, k: int = 32, seed: int = 0):
    """One prepared prompt's head scores by a gradient scorer: (float32 [L, H] on the host, info)."""
    check_scorer(scorer, k)
    why = gradient_refusal(runner.ad)
    if why is not None:
        raise HeadsteerError(f"--scorer {scorer}: {why}")
    if scorer == "atp":
        s, info = atp(runner, readout)
    elif scorer == "atp*":
        s, info = atp_star(runner, readout)
    elif scorer == "grad-coar":
        s, info = grad_coar(runner, readout, alpha, k, seed)
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
    a ``Baseline``.

    >>> import headsteer
    >>> from headsteer.ask import default_image
    >>> model, processor = headsteer.load("default")
    >>> s = gradient_scores(model, processor, default_image(), "what shape is in the image?", method="atp*")
    >>> tuple(s.shape), s.dtype
    ((4, 8), torch.float32)
    >>> [f"L{i // 8}H{i % 8}" for i in s.flatten().argsort(descending=True)[:2].tolist()]   # the top two heads
    ['L3H5', 'L1H7']
    """
    check_scorer(method, k)
    if method == "coar":
        raise HeadsteerError("gradient_scores takes method atp, atp* or grad-coar; COAR runs in headsteer attribute")
    runner = AblationRunner(model, processor, baseline).prepare(image, question)
    ad = runner.ad
    if answer is None:
        aid = int(runner(torch.zeros(1, ad.num_layers, ad.num_heads, dtype=torch.bool))[0].argmax())
    else:
        aid = ad.answer_token_id(answer, question)
    scores, _ = score_heads(runner, method, Readout(aid, statistic, candidates), alpha, k, seed)
    return scores
