"""Every run checks its own engine, on its first example, before its main work.

headsteer's numbers rest on transformers internals (the attention interface, caches, each family's
forward) that change from release to release. Tests pin what they can on the versions they ran on;
these checks pin it at run time, on the user's model, data and transformers:

- ``identity``: the empty intervention is bit-identical to the model's own forward (the attention
  function falls through to the model's backend, the hooks change nothing);
- ``fast_vs_naive`` (headsteer.attribution.engine.check_fast_path): the fast path equals a full
  forward per mask on a few masks;
- ``generation``: cached decoding of a few tokens under an intervention equals full forwards over the
  same tokens under the same intervention.

A check returns its figures as a dict (``passed`` among them) that the run writes to run.json. What to
do when one fails is the caller's: the fast path falls back to the naive one; a failed identity or
generation check stops the run with one line (``SelfCheckFailed``) naming the check, the family and
the transformers version.

Tolerances: fp32 results agree to 1e-4 of the logit scale (the largest |logit|). In bf16/fp16 two
correct paths differ by rounding: up to twice the precision contract's budget (1.5x the error of a
plain eager implementation, + 1e-3; docs/design.md), where that error is estimated on this prompt as
the difference between the model's own forward and headsteer's fp32-arithmetic one (``floor``), plus
two units in the last place of the logits' dtype at the logit scale (the logits themselves are rounded).
"""
from __future__ import annotations

import math
import time

import torch
import transformers

from .adapters import get_adapter
from .errors import HeadsteerError
from .intervention import intervene

SKIPPED = {"skipped": "--no-self-check"}


class SelfCheckFailed(HeadsteerError):
    """The engine does not reproduce its reference on this model and transformers version."""


def failure(check: str, ad, figures: dict) -> SelfCheckFailed:
    what = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
                     if k in ("max_abs_diff", "tolerance", "scale"))
    return SelfCheckFailed(f"self-check failed: {check} ({what}) on {ad.model_type} with transformers "
                           f"{transformers.__version__}; headsteer's numbers would be wrong here: use a transformers "
                           "version in the tested range (headsteer info) or report it; --no-self-check runs anyway")


def ulp(dtype, scale: float) -> float:
    """The spacing of ``dtype``'s numbers at ``scale``."""
    if scale <= 0:
        return 0.0
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(scale))


def tolerance(dtype, scale: float, floor: float = 0.0) -> float:
    """How far two correct paths may differ at this logit scale (see the module's docstring)."""
    if dtype == torch.float32 or dtype == torch.float64:
        return 1e-4 * max(1.0, scale)
    return 2 * (1.5 * floor + 1e-3) + 2 * ulp(dtype, scale)


def compare(got: torch.Tensor, ref: torch.Tensor, dtype, floor: float = 0.0) -> dict:
    """Figures of one comparison: max |got - ref|, the scale, the tolerance, passed."""
    got, ref = got.float().cpu(), ref.float().cpu()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    finite = bool(torch.isfinite(got).all() and torch.isfinite(ref).all())
    tol = tolerance(dtype, scale, floor)
    return {"max_abs_diff": diff, "scale": scale, "tolerance": tol, "passed": finite and diff <= tol}


def model_dtype(model):
    return next(model.parameters()).dtype


@torch.no_grad()
def check_identity(model, inputs) -> dict:
    """The empty intervention against the model's own forward: bit-identical last-position logits.
    Also measures ``floor`` (the model's own forward against headsteer's fp32-arithmetic attention),
    the rounding noise the other checks' tolerances allow for in bf16/fp16."""
    t0 = time.perf_counter()
    own = model(**inputs, logits_to_keep=1).logits[:, -1].float()
    with intervene(model):
        empty = model(**inputs, logits_to_keep=1).logits[:, -1].float()
    floor = 0.0
    if model_dtype(model) != torch.float32:
        with intervene(model, fp32_attention=True):
            floor = float((model(**inputs, logits_to_keep=1).logits[:, -1].float() - own).abs().max())
    diff = float((empty - own).abs().max())
    return {"max_abs_diff": diff, "scale": float(own.abs().max()), "tolerance": 0.0, "floor": floor,
            "passed": bool(torch.equal(empty, own)), "seconds": round(time.perf_counter() - t0, 3)}


@torch.no_grad()
def check_generation(model, inputs, context, floor: float = 0.0, new_tokens: int = 3, pad_token_id=None) -> dict:
    """Cached greedy decoding of ``new_tokens`` tokens inside ``context()`` (a fresh context manager:
    the intervention or edit) against full forwards, without a cache, over the same tokens inside it.
    Every step's logits are compared."""
    t0 = time.perf_counter()
    n = inputs["input_ids"].shape[1]
    kw = {} if pad_token_id is None else {"pad_token_id": pad_token_id}
    with context():
        gen = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **kw)
        seq = gen.sequences
        steps = len(gen.logits)
        full = dict(inputs, input_ids=seq[:, : n + steps - 1])
        if "attention_mask" in inputs:
            ones = torch.ones(seq.shape[0], steps - 1, dtype=inputs["attention_mask"].dtype, device=seq.device)
            full["attention_mask"] = torch.cat([inputs["attention_mask"], ones], 1)
        if "mm_token_type_ids" in inputs:  # the generated tokens are text
            pad = torch.zeros(seq.shape[0], steps - 1, dtype=inputs["mm_token_type_ids"].dtype, device=seq.device)
            full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], pad], 1)
        ref = model(**full, use_cache=False, logits_to_keep=steps).logits.float()
    cached = torch.stack(list(gen.logits), 1).float()
    out = compare(cached, ref, model_dtype(model), floor)
    out.update(tokens=steps, seconds=round(time.perf_counter() - t0, 3))
    return out


def check_example(model, processor, example: dict, **checks) -> dict:
    """``run_checks`` on one data row (its image and question); ``checks``: as there, where each callable
    takes the prepared inputs first (``fast_check(inputs)`` returns the fast check, or None)."""
    inputs = get_adapter(model, processor).encode([example["image"]], [example["question"]])
    fast = checks.get("fast_check")
    return run_checks(model, processor, inputs, generation_context=checks.get("generation_context"),
                      fast_check=fast(inputs) if fast is not None else None)


def run_checks(model, processor, inputs, *, generation_context=None, fast_check=None) -> dict:
    """The checks a run needs, in order, on one prepared example: identity always; ``fast_check``
    (a callable taking ``floor``, returning figures) where the run uses the fast path;
    ``generation_context`` (a callable returning a fresh context manager) where the run generates under
    an intervention. Raises ``SelfCheckFailed`` for a failed identity or generation check; a failed
    fast check is returned (the caller falls back to the naive path)."""
    ad = get_adapter(model, processor)
    t0 = time.perf_counter()
    out = {"family": ad.model_type, "transformers": transformers.__version__, "dtype": str(model_dtype(model)).replace("torch.", "")}
    out["identity"] = check_identity(model, inputs)
    if not out["identity"]["passed"]:
        raise failure("the empty intervention is not identical to the model's own forward", ad, out["identity"])
    floor = out["identity"]["floor"]
    fast = fast_check(floor) if fast_check is not None else None
    if fast is not None:  # None: the run takes the naive path anyway
        out["fast_vs_naive"] = fast
    if generation_context is not None:
        pad = getattr(getattr(processor, "tokenizer", None), "pad_token_id", None)
        out["generation"] = check_generation(model, inputs, generation_context, floor, pad_token_id=pad)
        if not out["generation"]["passed"]:
            raise failure("cached generation under the intervention differs from full forwards", ad, out["generation"])
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out
