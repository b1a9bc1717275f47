"""The paper's head ablation, as one object every attention path uses (the eager path, the
cross-attention path and the fast engine): which query rows read the baseline, and the baseline
keys/values they read.

Head (l, h) is ablated by giving its queries at text positions that see the image the baseline's
keys/values at the image positions; image positions keep their own attention. Per *query* head:
under grouped-query attention the shared KV head is replaced only for the selected query heads. In
a cross-attention layer every key is an image feature, so an ablated head reads the baseline at
every key, for every query.

The ablation can also be taken part of the way (``weight``, for gradient attribution): an ablated row
then reads a point on a path from its clean attention (weight 0) to its ablated one (weight 1), both
ends exact, and the gradient of a statistic with respect to the weights estimates what ablating each
head does (``interpolate`` says which path, and so which first-order estimate that gradient is).
"""
from __future__ import annotations

import torch

from .errors import HeadsteerError


# How an ablated row moves from clean (t = 0) to ablated (t = 1); see ``interpolate``.
PATHS = ("kv", "pattern", "output")


def interpolate(path: str, t, scores, scores_b, bias, softcap=None):
    """The attention weights of rows on the path from clean to ablated: ``(w, w_b)`` such that a row's
    output is ``w @ V + w_b @ V_b`` (``V_b``: the values with the baseline at the image keys). ``t``
    broadcasts to the rows ([..., R, 1]); ``scores``/``scores_b``: fp32 scaled q·k before any softcap,
    with the real and the baseline keys (equal outside the image keys); ``bias``: additive mask.

    - ``kv``: keys and values move linearly, K + t(K_b - K), V + t(V_b - V); the softmax is taken of the
      moved scores, so d/dt at 0 is attribution patching with the keys/values each query head reads as
      the leaves (AtP; linear through the softmax, which saturates).
    - ``pattern``: the attention pattern and the values move linearly, (A + t(A_b - A)) (V + t(V_b - V))
      with both patterns exact softmaxes; d/dt at 0 = (A_b - A) V + A (V_b - V): AtP* with its QK fix
      (the pattern's change exact, the value part linear; Kramár et al. 2024).
    - ``output``: the row's output moves linearly, z + t(z_b - z); d/dt = z_b - z, the exact change of
      the head's output (only what follows it is linearised).

    Every path gives the clean row at t = 0 and the exact ablated row at t = 1."""
    def soft(s):
        s = s if softcap is None else torch.tanh(s / softcap) * softcap
        return torch.softmax(s if bias is None else s + bias, dim=-1)

    if path == "kv":
        p = soft(scores + t * (scores_b - scores))
        return (1 - t) * p, t * p
    if path == "pattern":
        p = soft(scores)
        p = p + t * (soft(scores_b) - p)
        return (1 - t) * p, t * p
    if path == "output":
        return (1 - t) * soft(scores), t * soft(scores_b)
    raise HeadsteerError(f"unknown interpolation path {path!r}: use one of {', '.join(PATHS)}")


class Ablation:
    """``mask``: bool [B|1, L, H] on the host (True = ablated), one row per batch element or one for
    all; ``baseline``: a ``headsteer.baseline.Baseline``. ``weight`` (float [B|1, L, H], may require
    grad): how far each masked head is ablated, 0 = clean, 1 = ablated, along ``path`` (``interpolate``);
    None: every masked head fully ablated (the plain ablation)."""

    def __init__(self, mask: torch.Tensor, baseline, weight: torch.Tensor | None = None, path: str = "output"):
        self.mask, self.baseline = mask, baseline
        self.weight, self.path = weight, path
        self.layers = frozenset(int(l) for l in mask.any(dim=(0, 2)).nonzero().flatten())
        self._rows: tuple | None = None  # the fast path's row partition, worked out once per batch

    def acts_on(self, layer: int) -> bool:
        return layer in self.layers

    def selected(self, layer: int, queries: torch.Tensor | None, device) -> torch.Tensor:
        """bool [B|1, H, q|1, 1]: the score rows that read the baseline — ablated heads x ``queries``
        (bool [B, q], the queries that see the image; None: every query, as in a cross-attention layer)."""
        heads = self.mask[..., layer, :].to(device)[:, :, None, None]
        return heads if queries is None else heads & queries[:, None, :, None]

    def layer_weight(self, layer: int, device) -> torch.Tensor:
        """float [B|1, H] fp32: how far one layer's heads are ablated (the mask where no weight is given;
        0 for the heads outside the mask)."""
        mask = self.mask[..., layer, :].to(device=device, dtype=torch.float32)
        return mask if self.weight is None else mask * self.weight[..., layer, :].to(device=device, dtype=torch.float32)

    def image_kv(self, layer: int, n_img: int, dtype, device):
        """The baseline's image block: (keys, values), each [Hkv, n_img, d]."""
        return self.baseline.image_kv(layer, n_img, dtype, device)

    def placed(self, layer: int, key, value, image_keys, image_all, key_positions):
        """``key``/``value`` [B, Hkv, k, d] with the image keys (bool [B, k]) replaced by the baseline.
        The baseline is indexed by image ordinal, counted over absolute positions (``image_all`` bool
        [B, end], ``key_positions`` long [k]): a sliding-window cache may hold only a row's last image
        keys."""
        n_img = image_all.sum(1)
        if not bool((n_img == n_img[0]).all()):
            raise HeadsteerError(f"the rows of this batch have {n_img.tolist()} image positions; ablation with a baseline "
                                 "needs the same number in every row: use baseline='zero', or images of one size")
        ordinals = (image_all.long().cumsum(1) - 1)[:, key_positions]
        return self.baseline.kv(layer, key, value, image_keys, ordinals, int(n_img[0]))

    def fast_rows(self, M: int, Hkv: int, s: int, device):
        """For a batch of M masks over s suffix queries, in the fast path's row layout (per KV head:
        mask, query head in group, suffix position): the rows whose head is ablated, first, padded with
        rows that are not — ``rows`` int64 [L, Hkv, N] and ``valid`` bool [L, Hkv, N] on ``device``.
        Worked out once per batch on the host (no device sync inside the layers) and sent once."""
        key = (M, Hkv, s, str(device))
        if self._rows is not None and self._rows[0] == key:
            return self._rows[1]
        ablate = self.mask.expand(M, -1, -1)
        _, L, Hq = ablate.shape
        G = Hq // Hkv
        mg = ablate.view(M, L, Hkv, G).permute(1, 2, 0, 3).reshape(L, Hkv, M * G)
        counts = mg.sum(-1, keepdim=True)
        # a stable partition in O(n): ablated (mask, group) pairs first, in order, then the others
        pos = torch.where(mg, mg.cumsum(-1) - 1, counts + (~mg).cumsum(-1) - 1)
        order = torch.empty_like(pos).scatter_(-1, pos, torch.arange(M * G).expand_as(pos))
        n = max(1, int(counts.max()))
        order, valid = order[..., :n], torch.arange(n) < counts
        rows = (order[..., None] * s + torch.arange(s)).reshape(L, Hkv, n * s)
        valid = valid[..., None].expand(L, Hkv, n, s).reshape(L, Hkv, n * s)
        if torch.device(device).type == "cuda":
            rows, valid = rows.pin_memory().to(device, non_blocking=True), valid.pin_memory().to(device, non_blocking=True)
        else:
            rows, valid = rows.to(device), valid.to(device)
        self._rows = (key, (rows, valid))
        return rows, valid
