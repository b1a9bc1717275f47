"""``HeadSet``: a set of (layer, query head) pairs of a language model, as a value type.

Text form: comma-separated items ``L12H5`` (one head), ``L14H0-3`` (a range of heads),
``L20H*`` (every head of a layer), ``L2-4H1`` (a range of layers), ``*`` (every head; needs the
shape when converted to a mask). Indices are 0-based, as in the model's ``layer_idx``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .errors import HeadsteerError
from .fingerprint import same_weights, weights_by_dtype
from .paths import read_text

_ITEM = re.compile(r"^L(\d+|\*)(?:-(\d+))?H(\d+|\*)(?:-(\d+))?$")
_MAX_INDEX = 100_000  # no model has more layers or heads per layer; bounds what a shape-less parse expands


def _index(v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) and not (isinstance(v, float) and v.is_integer()):
        raise TypeError(v)
    return int(v)


@dataclass(frozen=True)
class HeadSet:
    """A set of attention heads, (layer, head) pairs: an immutable value with a text form that round-trips.

    >>> hs = HeadSet.parse("L2H0-3,L3H5")
    >>> str(hs), len(hs), (2, 1) in hs
    ('L2H0-3,L3H5', 5, True)
    >>> str(hs - HeadSet.parse("L2H1-3"))
    'L2H0,L3H5'
    """

    heads: frozenset  # of (layer, head) int pairs
    all_heads: bool = False  # "*" before a shape is known

    # -- construction -------------------------------------------------------------------------
    def __init__(self, heads: Iterable[tuple[int, int]] = (), all_heads: bool = False):
        try:
            pairs = frozenset((_index(l), _index(h)) for l, h in heads)
        except (TypeError, ValueError):
            raise HeadsteerError(f"heads are (layer, head) pairs of whole numbers or text like \"L2H0-3\"; got {heads!r}") from None
        if any(l < 0 or h < 0 for l, h in pairs):
            raise HeadsteerError(f"negative layer or head index in {sorted(pairs)}")
        object.__setattr__(self, "heads", pairs)
        object.__setattr__(self, "all_heads", bool(all_heads))

    @classmethod
    def parse(cls, text: "str | HeadSet | Iterable", num_layers: int | None = None, num_heads: int | None = None) -> "HeadSet":
        """Parse ``"L12H5,L14H0-3,L20H*"``. Wildcards need ``num_layers``/``num_heads`` unless the
        whole set is ``"*"``."""
        if isinstance(text, HeadSet):
            return text.resolve(num_layers, num_heads) if text.all_heads and num_layers else text
        if not isinstance(text, str):
            if isinstance(text, (bytes, int, float)) or not hasattr(text, "__iter__"):
                raise HeadsteerError(f"heads are text like \"L12H5,L14H0-3\" or (layer, head) pairs; got {text!r}")
            return cls(text)
        text = text.strip()
        if text in ("", "none"):
            return cls()
        if text in ("*", "all"):
            return cls.all(num_layers, num_heads) if num_layers and num_heads else cls(all_heads=True)
        out = set()
        for item in (t.strip() for t in text.split(",")):
            m = _ITEM.match(item.upper())
            if not m:
                raise HeadsteerError(f"cannot parse head {item!r}: write heads like L12H5, L14H0-3, L20H* or L2-4H1")
            l0, l1, h0, h1 = m.groups()
            layers = cls._span(l0, l1, num_layers, "layer", item)
            heads = cls._span(h0, h1, num_heads, "head", item)
            out.update((l, h) for l in layers for h in heads)
        hs = cls(out)
        if num_layers is not None and num_heads is not None:
            hs.validate(num_layers, num_heads)
        return hs

    @staticmethod
    def check_syntax(text: str) -> str:
        """Raise a clear error for malformed text; wildcards are fine (resolved against a model later)."""
        if text.strip() in ("", "none", "*", "all"):
            return text
        for item in (t.strip() for t in text.split(",")):
            if not _ITEM.match(item.upper()):
                raise HeadsteerError(f"cannot parse head {item!r}: write heads like L12H5, L14H0-3, L20H* or L2-4H1")
        return text

    @staticmethod
    def _span(a, b, n, what, item):
        if a == "*":
            if n is None:
                raise HeadsteerError(f"{item!r} uses a wildcard {what}; give the model so its number of {what}s is known")
            return range(n)
        lo, hi = int(a), int(b) if b is not None else int(a)
        if hi < lo:
            raise HeadsteerError(f"empty {what} range in {item!r}: write the lower index first")
        # ranges are checked before they are expanded (L0H0-3000000 must fail at once)
        if n is not None and hi >= n:
            raise HeadsteerError(f"{what} {hi} in {item!r} is out of range: the model has {n} {what}s ({what} 0-{n - 1})")
        if n is None and hi >= _MAX_INDEX:
            raise HeadsteerError(f"{what} {hi} in {item!r} is larger than any model's (at most {_MAX_INDEX - 1}): check the heads")
        return range(lo, hi + 1)

    @classmethod
    def all(cls, num_layers: int, num_heads: int) -> "HeadSet":
        return cls((l, h) for l in range(num_layers) for h in range(num_heads))

    @classmethod
    def from_mask(cls, mask) -> "HeadSet":
        m = torch.as_tensor(mask).bool()
        if m.ndim != 2:
            raise HeadsteerError(f"a head mask is [layers, heads]; got shape {tuple(m.shape)}")
        return cls(map(tuple, m.nonzero().tolist()))

    @classmethod
    def from_json(cls, data) -> "HeadSet":
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except ValueError as e:
                raise HeadsteerError(f"heads JSON is not valid JSON ({e}): give a JSON string like \"L2H0-3\", a list of "
                                     "[layer, head] pairs or {\"heads\": ...}") from None
        if isinstance(data, dict):
            if "heads" not in data:
                raise HeadsteerError(f"heads JSON object has no \"heads\" key: got keys {sorted(data)}")
            data = data["heads"]
        return cls.parse(data)

    # -- conversion ---------------------------------------------------------------------------
    def resolve(self, num_layers: int, num_heads: int) -> "HeadSet":
        hs = HeadSet.all(num_layers, num_heads) if self.all_heads else self
        hs.validate(num_layers, num_heads)
        return hs

    def validate(self, num_layers: int, num_heads: int) -> "HeadSet":
        bad = sorted((l, h) for l, h in self.heads if l >= num_layers or h >= num_heads)
        if bad:
            l, h = bad[0]
            raise HeadsteerError(
                f"head L{l}H{h} is out of range: the model has {num_layers} layers (L0-L{num_layers - 1}) "
                f"and {num_heads} query heads per layer (H0-H{num_heads - 1})"
            )
        return self

    def to_mask(self, num_layers: int, num_heads: int) -> torch.Tensor:
        hs = self.resolve(num_layers, num_heads)
        m = torch.zeros(num_layers, num_heads, dtype=torch.bool)
        for l, h in hs.heads:
            m[l, h] = True
        return m

    def to_json(self) -> str:
        return json.dumps(str(self))

    def layers(self) -> list[int]:
        return sorted({l for l, _ in self.heads})

    def heads_in(self, layer: int) -> list[int]:
        return sorted(h for l, h in self.heads if l == layer)

    # -- value semantics ----------------------------------------------------------------------
    def __str__(self) -> str:
        if self.all_heads:
            return "*"
        parts = []
        for layer in self.layers():
            hs = self.heads_in(layer)
            runs, start = [], hs[0]
            for prev, cur in zip(hs, hs[1:] + [None]):
                if cur != prev + 1:
                    runs.append(f"{start}" if start == prev else f"{start}-{prev}")
                    start = cur
            parts.extend(f"L{layer}H{r}" for r in runs)
        return ",".join(parts)

    def __repr__(self) -> str:
        return f"HeadSet({str(self)!r})"

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(sorted(self.heads))

    def __len__(self) -> int:
        return len(self.heads)

    def __contains__(self, item) -> bool:
        return tuple(item) in self.heads

    def __bool__(self) -> bool:
        return self.all_heads or bool(self.heads)

    def _other(self, other) -> "HeadSet":
        other = other if isinstance(other, HeadSet) else HeadSet.parse(other)
        if self.all_heads or other.all_heads:
            raise HeadsteerError("set algebra on '*' needs the model's shape: call .resolve(num_layers, num_heads) first")
        return other

    def __or__(self, other) -> "HeadSet":
        return HeadSet(self.heads | self._other(other).heads)

    def __and__(self, other) -> "HeadSet":
        return HeadSet(self.heads & self._other(other).heads)

    def __sub__(self, other) -> "HeadSet":
        return HeadSet(self.heads - self._other(other).heads)

    def __xor__(self, other) -> "HeadSet":
        return HeadSet(self.heads ^ self._other(other).heads)

    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            other = HeadSet.parse(other)
        return isinstance(other, HeadSet) and self.heads == other.heads and self.all_heads == other.all_heads

    def __hash__(self) -> int:
        return hash((self.heads, self.all_heads))


REGIME_WORDS = {"keep-only": "keep_only", "keep": "keep_only", "faithfulness": "keep_only",
                "removal": "removal", "remove": "removal", "completeness": "removal"}


def _rate_ranking(data: dict, alpha, run_dir) -> list[str]:
    """Heads of the ``alpha`` ranking of a multi-rate attribution run: a rate (0.5) or a regime
    (keep-only / removal: the rate the run found best for it)."""
    rates = data.get("rates") or []
    have = ", ".join(f"{r['alpha']:g}" for r in rates) or "only its primary rate"
    if isinstance(alpha, str) and alpha.strip().lower() in REGIME_WORDS:
        regime = REGIME_WORDS[alpha.strip().lower()]
        if regime not in (data.get("regimes") or {}):
            raise HeadsteerError(f"{run_dir} has no {alpha} regime (it needs several rates and held-out curves: "
                                 "`headsteer attribute --alpha 0.1,0.5,0.9`); give a rate instead")
        alpha = data["regimes"][regime]["alpha"]
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise HeadsteerError(f"--rate takes an ablation rate of the run (e.g. 0.5) or keep-only / removal; got {alpha!r}") from None
    if not rates and abs(a - float(data.get("settings", {}).get("alpha", float("nan")))) < 1e-9:
        return [r["head"] for r in data["heads"]]
    for r in rates:
        if abs(float(r["alpha"]) - a) < 1e-9:
            return [h["head"] for h in r["heads"]]
    raise HeadsteerError(f"{run_dir} has no ranking at rate {a:g}: it has rates {have} (rerun `headsteer attribute "
                         f"--alpha` with it)")


def model_record(model, num_layers: int, num_heads: int) -> dict:
    """What an attribution run records of the model it ranked (``heads.json["model"]``): its shape,
    and its weights' fingerprints cast to each dtype, so a later edit can tell the run is of its model
    in whatever dtype each was loaded."""
    return {"num_layers": num_layers, "num_heads": num_heads, "weights_by_dtype": weights_by_dtype(model)}


def _run_shape(data: dict) -> tuple[int, int] | None:
    rec = data.get("model")
    if isinstance(rec, dict) and isinstance(rec.get("num_layers"), int) and isinstance(rec.get("num_heads"), int):
        return rec["num_layers"], rec["num_heads"]
    # older runs: the table ranks every head of the model, so its extent is the model's shape
    try:
        pairs = [h for r in data["heads"] for h in HeadSet.parse(r["head"])]
    except (HeadsteerError, KeyError, TypeError):
        return None
    if not pairs:
        return None
    L, H = max(p[0] for p in pairs) + 1, max(p[1] for p in pairs) + 1
    return (L, H) if len(set(pairs)) == L * H else None


def check_run_model(run_dir, data: dict, num_layers: int | None, num_heads: int | None, model=None) -> None:
    """Refuse the attribution run ``run_dir`` (its heads.json ``data``) unless it ranked this model:
    the same layer and head counts and, given ``model``, the same weights (``same_weights``; a run
    whose record cannot tell — an older run in a coarser dtype — is taken on its shape)."""
    shape = _run_shape(data)
    if shape is not None and num_layers is not None and shape != (num_layers, num_heads):
        raise HeadsteerError(f"{run_dir} ranks the heads of a model with {shape[0]} layers x {shape[1]} heads; this model "
                             f"has {num_layers} x {num_heads}: attribute this model (`headsteer attribute --model ...`) or "
                             "name the heads with --heads")
    if model is None:
        return
    rec = data.get("model") if isinstance(data.get("model"), dict) else {}
    ident = {}
    try:
        ident = json.loads(read_text(Path(run_dir) / "run.json", "run record")).get("identity") or {}
    except (HeadsteerError, ValueError, AttributeError):
        pass
    same = same_weights(model, rec.get("weights_by_dtype"), ident.get("weights"), ident.get("dtype"))
    if same is False:
        raise HeadsteerError(f"{run_dir} was attributed on other weights than this model's ({ident.get('weights', '?')[:12]}…): "
                             "its ranking is of another model; attribute this one, or name the heads with --heads")


def top_heads(run_dir, k: int, num_layers: int | None = None, num_heads: int | None = None, alpha=None, model=None) -> HeadSet:
    """The ``k`` highest-ranked heads of a ``headsteer attribute`` run directory: of its primary
    ranking, or with ``alpha`` of the ranking fitted at that ablation rate (a run of several
    rates, ``--alpha 0.1,0.5,0.9``), or of the rate it found best for ``"keep-only"`` or
    ``"removal"``. A run of another model (other layer/head counts, or other weights than
    ``model``'s) is refused."""
    path = Path(run_dir) / "heads.json"
    if not path.exists() and not path.is_symlink():
        raise HeadsteerError(f"{run_dir} is not an attribution run (no heads.json): give the --out of `headsteer attribute`")
    try:
        data = json.loads(read_text(path, "heads.json"))
        ranked = [r["head"] for r in data["heads"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise HeadsteerError(f"{path} is not a headsteer heads.json (rerun `headsteer attribute`)") from None
    check_run_model(run_dir, data, num_layers, num_heads, model)
    if alpha is not None:
        ranked = _rate_ranking(data, alpha, run_dir)
    if not isinstance(k, int) or k < 1 or k > len(ranked):
        raise HeadsteerError(f"--top-k must be between 1 and {len(ranked)} (the heads ranked in {run_dir}); got {k}")
    return HeadSet.parse(",".join(ranked[:k]), num_layers, num_heads)


def _resolved_rate(run_dir, rate) -> float:
    """The rate a --rate value names (a regime word resolves to the run's rate for it)."""
    if isinstance(rate, str) and rate.strip().lower() in REGIME_WORDS:
        data = json.loads(read_text(Path(run_dir) / "heads.json", "heads.json"))
        return float(data["regimes"][REGIME_WORDS[rate.strip().lower()]]["alpha"])
    return float(rate)


def random_heads(k: int, num_layers: int, num_heads: int, seed: int = 0) -> HeadSet:
    """``k`` heads drawn uniformly without replacement (seeded)."""
    n = num_layers * num_heads
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise HeadsteerError(f"the seed must be a whole number >= 0; got {seed!r}")
    if not 1 <= k <= n:
        raise HeadsteerError(f"random:K needs 1 <= K <= {n} (the model's heads); got {k}")
    idx = np.random.default_rng(seed).choice(n, size=k, replace=False)
    return HeadSet((int(i // num_heads), int(i % num_heads)) for i in idx)


def select_heads(heads: str | None, from_attribution=None, top_k: int = 4, *, num_layers: int, num_heads: int,
                 seed: int = 0, rate=None, model=None) -> tuple[HeadSet, dict | None]:
    """The heads a command acts on: ``heads`` text (``L2H0-3``, ``random:K``) or the top ``top_k``
    of an attribution run (``rate``: the ranking of that ablation rate, or keep-only / removal;
    see ``top_heads``; a run of another model than ``model`` is refused). Returns the HeadSet —
    never an empty one — and, for an attribution, where it came from."""
    if rate is not None and not from_attribution:
        raise HeadsteerError("--rate picks a ranking of an attribution run: give --from-attribution DIR with it")
    if heads is not None and not (isinstance(heads, str) and heads.strip(" ,")):
        raise HeadsteerError(f"--heads {heads!r} names no head: give heads like L2H0-3,L3H5 (or random:K)")
    if heads and from_attribution:
        raise HeadsteerError("give either --heads or --from-attribution, not both")
    if heads:
        if heads.startswith("random:"):
            k = heads.split(":", 1)[1]
            if not k.strip().lstrip("-").isdigit():
                raise HeadsteerError(f"random:K takes a whole number of heads, e.g. random:4; got {heads!r}")
            return random_heads(int(k), num_layers, num_heads, seed), None
        return HeadSet.parse(heads, num_layers, num_heads), None
    if from_attribution:
        hs = top_heads(from_attribution, top_k, num_layers, num_heads, alpha=rate, model=model)
        info = {"run": str(from_attribution), "top_k": top_k}
        if rate is not None:
            info["alpha"] = _resolved_rate(from_attribution, rate)
        return hs, info
    raise HeadsteerError("say which heads: --heads L2H0-3 (or random:K), or --from-attribution DIR --top-k K")
