"""Cross-modal transfer: how much the answer depends on image information flowing through heads.

Per example: (a) image reliance = answer logit minus the answer logit with every head's image flow
ablated; (b) attention mass of the text after the image on image tokens, per layer; (c) answer
with a blank image; (d) the share of (a) that the top-k attributed heads recover alone (all other
heads ablated). Logits are those of the answer's first token at the last prompt position."""
from __future__ import annotations

import torch

from headsteer.adapters import get_adapter
from headsteer.baseline import blank_image
from headsteer.heads import HeadSet
from headsteer.intervention import Recorder, intervene

from .accuracy import candidate_token_ids, predict_closed, single_token_ids

# |image reliance| below this (in logits) leaves the top-k share undefined (NaN)
MIN_RELIANCE = 1e-6


@torch.no_grad()
def transfer_batch(model, processor, images, questions, answers, baseline, top_heads: HeadSet | None = None,
                   candidates: list[str] | None = None) -> list[dict]:
    """Transfer metrics for a batch of examples (any active edit applies underneath). Everything
    stays on the model's device; the rows cross to the host at the end."""
    ad = get_adapter(model, processor)
    L, H = ad.num_layers, ad.num_heads
    inputs = ad.encode(images, questions)
    dev = inputs["input_ids"].device
    rows = torch.arange(len(images), device=dev)
    aid = torch.tensor([ad.answer_token_id(a, q) for a, q in zip(answers, questions)], device=dev)
    rec = Recorder(L, H)
    with intervene(model, recorder=rec):
        clean = model(**inputs, logits_to_keep=1).logits[:, -1].float()
    everything = torch.ones(1, L, H, dtype=torch.bool)
    with intervene(model, ablate=everything, baseline=baseline):
        none = model(**inputs, logits_to_keep=1).logits[:, -1].float()
    blanks = [blank_image(processor)] * len(images)
    blank = model(**ad.encode(blanks, questions), logits_to_keep=1).logits[:, -1].float()
    keep = None
    if top_heads is not None and len(top_heads):
        m = ~top_heads.to_mask(L, H)
        with intervene(model, ablate=m[None], baseline=baseline):
            keep = model(**inputs, logits_to_keep=1).logits[:, -1].float()

    seqs = candidate_token_ids(model, processor, candidates, questions[0]) if candidates else None
    firsts = single_token_ids(seqs) if seqs is not None else None
    if candidates is None or firsts is not None:
        # the answer is decided by its first token: greedy over the vocabulary, or over the candidates' tokens
        cand = torch.tensor(firsts, device=dev) if firsts is not None else None

        def pred(lg):
            return lg.argmax(-1) if cand is None else cand[lg[:, cand].argmax(-1)]

        correct_blank, correct_none = pred(blank) == aid, pred(none) == aid
    else:
        # candidates of several tokens (or sharing one): the whole answer, as accuracy scores it;
        # an ablation places its baseline per prompt row, so candidates run one at a time there
        truth = torch.tensor([candidates.index(a) if a in candidates else -1 for a in answers], device=dev)
        idx = {c: i for i, c in enumerate(candidates)}
        b = predict_closed(model, processor, blanks, questions, candidates)[0]
        with intervene(model, ablate=everything, baseline=baseline):
            n = predict_closed(model, processor, images, questions, candidates, chunk=1)[0]
        correct_blank = torch.tensor([idx[p] for p in b], device=dev) == truth
        correct_none = torch.tensor([idx[p] for p in n], device=dev) == truth

    reliance = clean[rows, aid] - none[rows, aid]
    recovered = None
    if keep is not None:
        share = (keep[rows, aid] - none[rows, aid]) / reliance
        recovered = torch.where(reliance.abs() > MIN_RELIANCE, share, torch.full_like(share, float("nan")))
    # results cross to the host here, once
    reliance, correct_blank, correct_none = reliance.cpu().tolist(), correct_blank.cpu().tolist(), correct_none.cpu().tolist()
    attn = rec.per_example().cpu().tolist()
    recovered = recovered.cpu().tolist() if recovered is not None else None
    out = []
    for i in range(len(images)):
        r = {"image_reliance": float(reliance[i]), "attn_to_image": attn[i], "correct_blank": bool(correct_blank[i]),
             "correct_no_image_flow": bool(correct_none[i])}
        if recovered is not None:
            r["topk_recovered"] = float(recovered[i])
        out.append(r)
    return out
