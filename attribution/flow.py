"""Token-level information flow by attention knockout (Geva et al. 2023): block the attention
edges from a source token group to a target group in a window of layers (or in a HeadSet) and
measure the relative change of the answer probability (or logit), window by window over the depth."""
from __future__ import annotations

import numpy as np
import torch

from headsteer.adapters import get_adapter
from headsteer.errors import HeadsteerError
from headsteer.heads import HeadSet
from headsteer.intervene import Knockout, intervene

# (source keys, target queries): information of the source can no longer reach the target directly.
EDGES = {
    "image->last": ("image", "last"),
    "image->question": ("image", "question"),
    "image->role": ("image", "role"),
    "question->role": ("question", "role"),
    "question->last": ("question", "last"),
    "role->last": ("role", "last"),
    "object->last": ("object", "last"),
    "background->last": ("background", "last"),
}


MEASURES = {"prob": lambda z: z.float().softmax(-1), "logit": lambda z: z.float()}
MEASURE_WORDS = {"prob": "probability", "logit": "logit"}


def patch_mask(pixel_mask, n_tokens: int, threshold: float = 0.0) -> torch.Tensor:
    """bool [n_tokens]: which image tokens (a square grid over the image) cover the object.

    ``pixel_mask`` is bool [H, W] (e.g. easy-VQA's object mask) or a box (x0, y0, x1, y1, W, H).
    A patch is an object patch when more than ``threshold`` of its pixels are object pixels."""
    g = int(round(n_tokens ** 0.5))
    if g * g != n_tokens:
        raise HeadsteerError(f"object/background split needs a square grid of image tokens; this prompt has {n_tokens}")
    if isinstance(pixel_mask, (tuple, list)) and len(pixel_mask) == 6:
        x0, y0, x1, y1, W, H = pixel_mask
        m = torch.zeros(int(H), int(W))
        m[int(y0) : int(y1), int(x0) : int(x1)] = 1
    else:
        m = torch.as_tensor(np.asarray(pixel_mask), dtype=torch.float32)
    frac = torch.nn.functional.adaptive_avg_pool2d(m[None, None].float(), (g, g))[0, 0]
    return (frac > threshold).reshape(-1)


def windows(num_layers: int, k: int) -> list[list[int]]:
    if not 1 <= k <= num_layers:
        raise HeadsteerError(f"window must be between 1 and {num_layers} layers")
    return [list(range(s, s + k)) for s in range(num_layers - k + 1)]


def _head_masks_for_windows(ad, wins, heads: HeadSet | None) -> torch.Tensor:
    out = torch.zeros(len(wins), ad.num_layers, ad.num_heads, dtype=torch.bool)
    allowed = heads.to_mask(ad.num_layers, ad.num_heads) if heads is not None else torch.ones(ad.num_layers, ad.num_heads, dtype=torch.bool)
    for i, w in enumerate(wins):
        out[i, w] = allowed[w]
    return out


@torch.no_grad()
def knockout_effects(model, processor, image, question, answer, edges=EDGES, window: int = 1, head_masks=None,
                     object_mask=None, batch_size: int = 64, measure: str = "prob") -> dict:
    """Relative change of the answer probability, (p_knocked / p_clean) - 1, per edge and per
    layer window (or per given head mask [C, L, H] when ``head_masks`` is set).

    ``measure="logit"``: the same for the answer logit. A model that answers with p ~ 1 (the
    default model does) shows no probability change until the answer flips; its logit still moves."""
    if measure not in MEASURES:
        raise HeadsteerError(f"unknown measure {measure!r}: use {' or '.join(MEASURES)}")
    ad = get_adapter(model, processor)
    inputs = ad.encode([image], [question])
    aid = ad.answer_token_id(answer, question)
    n_img = int(ad.image_mask(inputs["input_ids"]).sum())
    obj = patch_mask(object_mask, n_img)[None] if object_mask is not None else None
    clean = MEASURES[measure](model(**inputs).logits[:, -1])[0, aid].item()
    if head_masks is None:
        wins = windows(ad.num_layers, window)
        head_masks = _head_masks_for_windows(ad, wins, None)
    C = len(head_masks)
    edge_names = [e for e in edges if obj is not None or edges[e][0] not in ("object", "background")]
    results = {}
    configs = [(e, c) for e in edge_names for c in range(C)]
    for i in range(0, len(configs), batch_size):
        chunk = configs[i : i + batch_size]
        B = len(chunk)
        batch = _repeat_inputs(inputs, B)
        kos = []
        for e in {e for e, _ in chunk}:
            src, dst = edges[e]
            hm = torch.stack([head_masks[c] if ce == e else torch.zeros_like(head_masks[0]) for ce, c in chunk])
            kos.append(Knockout(src, dst, heads=hm))
        with intervene(model, knockouts=kos, object_patches=obj.expand(B, -1) if obj is not None else None):
            p = MEASURES[measure](model(**batch).logits[:, -1])[:, aid]
        for (e, c), pp in zip(chunk, p.tolist()):
            results.setdefault(e, [0.0] * C)[c] = (pp - clean) / max(abs(clean), 1e-12)
    return {"clean": clean, "measure": measure, "effects": results}


def _repeat_inputs(inputs, B):
    out = {}
    for k, v in inputs.items():
        if torch.is_tensor(v) and k == "image_grid_thw":
            out[k] = v.repeat(B, 1)
        elif torch.is_tensor(v) and k == "pixel_values" and v.ndim == 2:  # Qwen-style flattened patches
            out[k] = v.repeat(B, 1)
        elif torch.is_tensor(v):
            out[k] = v.expand(B, *v.shape[1:]).contiguous()
        else:
            out[k] = v
    return out


def flow_dataset(model, processor, dataset, n_images=20, window=1, heads: HeadSet | None = None, n_random=3, seed=0, progress=None,
                 measure: str = "prob") -> dict:
    """Mean relative change per edge and layer window over ``dataset`` rows; when ``heads`` is
    given, also the knockout restricted to those heads (all layers) vs random head sets of the
    same size."""
    ad = get_adapter(model, processor)
    wins = windows(ad.num_layers, window)
    per, clean = [], []
    restricted = []
    rng = np.random.default_rng(seed)
    for i in range(min(n_images, len(dataset))):
        ex = dataset[i]
        om = ex.get("object_mask")
        if om is None and ex.get("object_box") is not None:
            om = tuple(ex["object_box"])
        r = knockout_effects(model, processor, ex["image"], ex["question"], ex["answer"], window=window, object_mask=om,
                             measure=measure)
        per.append(r["effects"])
        clean.append(r["clean"])
        if heads is not None:
            n = len(heads)
            sets = [heads.to_mask(ad.num_layers, ad.num_heads)]
            for _ in range(n_random):
                idx = rng.choice(ad.num_layers * ad.num_heads, size=n, replace=False)
                m = torch.zeros(ad.num_layers * ad.num_heads, dtype=torch.bool)
                m[idx] = True
                sets.append(m.view(ad.num_layers, ad.num_heads))
            rr = knockout_effects(model, processor, ex["image"], ex["question"], ex["answer"], head_masks=torch.stack(sets), object_mask=om,
                                  measure=measure)
            restricted.append(rr["effects"])
        if progress is not None:
            progress(1)
    edges = list(per[0])
    out = {"windows": [[w[0], w[-1]] for w in wins], "n_images": len(per), "measure": measure, "clean_mean": float(np.mean(clean)),
           "edges": {e: np.mean([p[e] for p in per], axis=0).tolist() for e in edges},
           "stderr": {e: (np.std([p[e] for p in per], axis=0, ddof=1) / np.sqrt(len(per))).tolist() if len(per) > 1 else [0.0] * len(wins) for e in edges}}
    if heads is not None:
        out["heads"] = str(heads)
        out["restricted"] = {e: {"attributed": float(np.mean([r[e][0] for r in restricted])),
                                 "random": float(np.mean([np.mean(r[e][1:]) for r in restricted]))} for e in edges}
    return out


def describe(flow: dict) -> list[str]:
    """Plain statements of where each edge matters, from the measured numbers."""
    lines = []
    if flow.get("measure") == "prob" and flow.get("clean_mean", 0) > 0.99:
        lines.append(f"- the answer probability is saturated (mean {flow['clean_mean']:.4f}): a knockout barely moves it "
                     "unless the answer flips; `--measure logit` shows graded effects")
    wins = flow["windows"]
    for e, vals in flow["edges"].items():
        j = int(np.argmin(vals))
        w = wins[j]
        where = f"layer {w[0]}" if w[0] == w[1] else f"layers {w[0]}-{w[1]}"
        lines.append(f"- {e}: largest drop {vals[j]:+.1%} when knocked out in {where}; "
                     f"per window: " + ", ".join(f"{v:+.1%}" for v in vals))
    if "object->last" in flow["edges"] and "background->last" in flow["edges"]:
        o, b = min(flow["edges"]["object->last"]), min(flow["edges"]["background->last"])
        lines.append(f"- object vs background patches -> last: strongest drops {o:+.1%} vs {b:+.1%}")
    if "restricted" in flow:
        for e, v in flow["restricted"].items():
            lines.append(f"- {e} knocked out only in the attributed heads ({flow['heads']}): {v['attributed']:+.1%}; "
                         f"in random heads of the same count: {v['random']:+.1%}")
    return lines
