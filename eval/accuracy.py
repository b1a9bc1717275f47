"""VQA scoring: closed vocabulary (the candidate answer the model finds most likely) or open
(greedy generation, official VQAv2 normalisation and accuracy), per question type, bootstrap CIs."""
from __future__ import annotations

import copy

import numpy as np
import torch

from headsteer.adapters import get_adapter
from headsteer.errors import HeadsteerError
from headsteer.stats import bootstrap_ci

from .vqa_answers import normalize_answer, vqa_accuracy  # noqa: F401  (normalize_answer is re-exported)


def soft_accuracy(pred: str, answers) -> float:
    """Official VQAv2 accuracy over the reference answers (exact match with one reference)."""
    return vqa_accuracy(pred, answers)


def answer_token_ids(ad, answer: str, question: str = "what is in the image?") -> list[int]:
    """Token ids of the whole answer as the model would emit it right after the prompt (the first
    is ``ad.answer_token_id``)."""
    tok = ad.processor.tokenizer
    prompt = ad.prompt(question).replace(getattr(ad.processor, "image_token", "<image>"), "")
    sep = "" if prompt[-1:].isspace() else " "
    base = tok(prompt, add_special_tokens=False).input_ids
    full = tok(prompt + sep + answer, add_special_tokens=False).input_ids
    ids = full[len(base):] if len(full) > len(base) and full[: len(base)] == base else \
        tok(sep + answer, add_special_tokens=False).input_ids
    if not ids:
        raise HeadsteerError(f"answer {answer!r} has no tokens")
    return ids


def single_token_ids(seqs: list[list[int]]) -> list[int] | None:
    """The candidates' token ids when each is one token and no two share it (the first token then
    decides the answer), else None."""
    firsts = [x[0] for x in seqs]
    return firsts if all(len(x) == 1 for x in seqs) and len(set(firsts)) == len(firsts) else None


def candidate_token_ids(model, processor, candidates: list[str], question: str) -> list[list[int]]:
    """Each candidate's whole token sequence after the prompt (checked: they can be told apart)."""
    return _candidate_ids(get_adapter(model, processor), model, processor, candidates, question)[0]


def _end_ids(model, processor) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = processor.tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _candidate_ids(ad, model, processor, candidates, question):
    seqs = [answer_token_ids(ad, c, question) for c in candidates]
    end = _end_ids(model, processor)
    if not end:
        for i, a in enumerate(seqs):
            for j, b in enumerate(seqs):
                if i != j and len(a) < len(b) and b[: len(a)] == a:
                    raise HeadsteerError(f"candidates {candidates[i]!r} and {candidates[j]!r} share their first tokens and "
                                         "the model has no end-of-sequence token to tell them apart; drop one of them")
    return seqs, end


@torch.no_grad()
def _sequence_scores(model, processor, images, questions, seqs, end, chunk):
    """[B, C] log p(answer tokens, end | prompt) by teacher forcing: each prompt runs once, and
    its KV cache is shared by a batch of candidate continuations."""
    ad = get_adapter(model, processor)
    scores, last = [], []
    for image, question in zip(images, questions):
        inputs = ad.encode([image], [question])  # one prompt: no padding, so positions continue plainly
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        first = out.logits[0, -1].float().log_softmax(-1)
        last.append(out.logits[0, -1].float())
        dev = first.device
        row = []
        for s in range(0, len(seqs), chunk):
            part = seqs[s : s + chunk]
            n, width = len(part), max(len(x) for x in part)
            lengths = torch.tensor([len(x) for x in part], device=dev)
            ids = torch.zeros(n, width, dtype=torch.long, device=dev)
            for i, x in enumerate(part):
                ids[i, : len(x)] = torch.tensor(x, device=dev)
            cache = copy.deepcopy(out.cache)
            cache.batch_repeat_interleave(n)
            # No attention mask: the prompt has no padding and the candidates' right padding comes
            # after all their real tokens, which are causal. (A full-length mask would also make
            # Qwen-VL recompute its 3D positions for the whole sequence.)
            lp = model(input_ids=ids, cache=cache, use_cache=True).logits.float().log_softmax(-1)
            # position j predicts token j + 1; the last real position predicts the end
            nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)
            inner = torch.where(torch.arange(width, device=dev)[None] < lengths[:, None] - 1,
                                lp.gather(-1, nxt[..., None])[..., 0], 0.0)
            at_end = lp[torch.arange(n, device=dev), lengths - 1]
            stop = torch.logsumexp(at_end[:, end], -1) if end else torch.zeros(n, device=dev)
            row.append(first[ids[:, 0]] + inner.sum(1) + stop)
        scores.append(torch.cat(row))
    return torch.stack(scores).cpu(), torch.stack(last).cpu()


def score_candidates(model, processor, images, questions, candidates: list[str], chunk: int = 32) -> torch.Tensor:
    """[B, C] log-probability of each whole candidate answer (its tokens, then the end of
    sequence) after each prompt, on the host."""
    ad = get_adapter(model, processor)
    seqs, end = _candidate_ids(ad, model, processor, candidates, questions[0])
    return _sequence_scores(model, processor, images, questions, seqs, end, chunk)[0]


@torch.no_grad()
def predict_closed(model, processor, images, questions, candidates: list[str], chunk: int = 32) -> tuple[list[str], torch.Tensor]:
    """The most likely candidate answer per example, and the last prompt position's logits (host).

    When every candidate is one token and no two share it (easy-VQA), that token decides the
    answer: one forward, argmax over the candidates' tokens. Otherwise each whole candidate is
    scored by teacher forcing (``score_candidates``), so "red" and "red shape" can both win; under
    an active head ablation pass ``chunk=1`` (its baseline K/V is placed per prompt row)."""
    ad = get_adapter(model, processor)
    seqs, end = _candidate_ids(ad, model, processor, candidates, questions[0])
    firsts = single_token_ids(seqs)
    if firsts is not None:
        logits = model(**ad.encode(images, questions), logits_to_keep=1).logits[:, -1].float()
        best = logits[:, torch.tensor(firsts, device=logits.device)].argmax(-1).tolist()
        return [candidates[b] for b in best], logits.cpu()
    scores, logits = _sequence_scores(model, processor, images, questions, seqs, end, chunk)
    return [candidates[b] for b in scores.argmax(-1).tolist()], logits


OPEN_FALLBACK_TOKENS = 10  # open answers' length when neither the caller nor the model's generation config gives one


@torch.no_grad()
def predict_open(model, processor, images, questions, max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers. Their length and end token come from the model's generation config
    (``max_new_tokens``/``max_length``, ``eos_token_id``: the embedded model ends its one-word answer
    with ``</s>``), else ``OPEN_FALLBACK_TOKENS`` new tokens; ``max_new_tokens`` overrides."""
    ad = get_adapter(model, processor)
    inputs = ad.encode(images, questions)
    tok = processor.tokenizer
    gc = getattr(model, "generation_config", None)
    kw = {}
    if max_new_tokens is not None:
        kw["max_new_tokens"] = max_new_tokens
    elif gc is None or getattr(gc, "max_new_tokens", None) is None:
        kw["max_new_tokens"] = OPEN_FALLBACK_TOKENS  # transformers' own default (max_length 20) counts the prompt
    if gc is None or getattr(gc, "pad_token_id", None) is None:
        kw["pad_token_id"] = tok.pad_token_id
    out = model.generate(**inputs, do_sample=False, **kw)
    return [s.strip() for s in tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


def summarize(rows: list[dict], key: str = "correct", seed: int = 0) -> dict:
    """Overall and per-question-type mean of ``key`` with bootstrap CIs."""
    out = {}
    groups = {"all": rows}
    for r in rows:
        groups.setdefault(r.get("qtype") or "all", []).append(r) if (r.get("qtype") or "all") != "all" else None
    for name, rs in groups.items():
        vals = [float(r[key]) for r in rs]
        lo, hi = bootstrap_ci(vals, seed=seed)
        out[name] = {"accuracy": float(np.mean(vals)) if vals else float("nan"), "ci": [lo, hi], "n": len(vals)}
    return out

