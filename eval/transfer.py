"""Cross-modal transfer: how much the answer depends on image information flowing through heads.

Per example: (a) image reliance = answer logit minus the answer logit with every head's image flow
ablated; (b) attention mass of the text after the image on image tokens, per layer; (c) answer
with a blank image; (d) the share of (a) that the top-k attributed heads recover alone (all other
heads ablated)."""
from __future__ import annotations

import torch

from headsteer.adapters import get_adapter
from headsteer.baseline import blank_image
from headsteer.heads import HeadSet
from headsteer.intervene import Recorder, intervene


@torch.no_grad()
def transfer_batch(model, processor, images, questions, answers, baseline, top_heads: HeadSet | None = None,
                   candidates: list[str] | None = None) -> list[dict]:
    """Transfer metrics for a batch of examples (any active edit applies underneath)."""
    ad = get_adapter(model, processor)
    L, H = ad.num_layers, ad.num_heads
    inputs = ad.encode(images, questions)
    aid = torch.tensor([ad.answer_token_id(a, q) for a, q in zip(answers, questions)])
    rec = Recorder(L, H)
    with intervene(model, recorder=rec):
        clean = model(**inputs, logits_to_keep=1).logits[:, -1].float()
    per_layer = rec.per_example().tolist()
    everything = torch.ones(1, L, H, dtype=torch.bool)
    with intervene(model, ablate=everything, baseline=baseline):
        none = model(**inputs, logits_to_keep=1).logits[:, -1].float()
    blank = ad.encode([blank_image(processor)] * len(images), questions)
    blank_logits = model(**blank, logits_to_keep=1).logits[:, -1].float()
    keep = None
    if top_heads is not None and len(top_heads):
        m = ~top_heads.to_mask(L, H)
        with intervene(model, ablate=m[None], baseline=baseline):
            keep = model(**inputs, logits_to_keep=1).logits[:, -1].float()
    cand_ids = [ad.answer_token_id(c, questions[0]) for c in candidates] if candidates else None

    def pred(lg):
        if cand_ids is None:
            return lg.argmax(-1)
        return torch.tensor(cand_ids)[lg[:, cand_ids].argmax(-1)]

    out = []
    for i in range(len(images)):
        r = {
            "image_reliance": float(clean[i, aid[i]] - none[i, aid[i]]),
            "attn_to_image": per_layer[i],
            "correct_blank": bool(pred(blank_logits)[i] == aid[i]),
            "correct_no_image_flow": bool(pred(none)[i] == aid[i]),
        }
        if keep is not None:
            full = float(clean[i, aid[i]] - none[i, aid[i]])
            r["topk_recovered"] = float(keep[i, aid[i]] - none[i, aid[i]]) / full if abs(full) > 1e-6 else float("nan")
        out.append(r)
    return out
