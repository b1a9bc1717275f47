"""Token-level information flow by attention knockout (Geva et al. 2023): block the attention
edges from a source token group to a target group in a window of layers (or in a HeadSet) and
measure the change of the answer, window by window over the depth.

Logits are defined up to a constant, so a change is never divided by a raw logit: it is reported in
logits (``logit_diff``), as a fraction of the full image knockout's change (``image_frac``, the
normalisation of activation patching), or as the relative change of the answer probability
(``prob``, which saturates when the model answers with p ~ 1)."""
from __future__ import annotations

import numpy as np
import torch

from headsteer.adapters import get_adapter
from headsteer.errors import HeadsteerError
from headsteer.heads import HeadSet
from headsteer.intervention import Knockout, intervene

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


# name -> (what a number means, the plot's y-axis); effects are stored as fractions for image_frac
# and prob, in logits for logit_diff
MEASURES = {
    "image_frac": ("change of the answer logit as a share of the full image knockout's change (image -> all text, "
                   "all layers); -100% = as large a drop", "answer-logit change / |image-knockout change| (%)"),
    "logit_diff": ("change of the answer logit, knocked out minus clean (logits)", "change of the answer logit (logits)"),
    "prob": ("relative change of the answer probability, p_knocked / p_clean - 1", "relative change of answer probability (%)"),
}
MEASURE_WORDS = {k: v[0] for k, v in MEASURES.items()}
DEFAULT_MEASURE = "image_frac"
# below this |image-knockout change| (logits) an image's image_frac is undefined: left out and counted
MIN_IMAGE_EFFECT = 1e-3


def check_measure(measure: str) -> str:
    if measure == "logit":
        raise HeadsteerError("measure 'logit' (a change divided by the raw answer logit, which depends on the logits' "
                             "arbitrary offset) is gone: use logit_diff (in logits) or image_frac (share of the image knockout)")
    if measure not in MEASURES:
        raise HeadsteerError(f"unknown measure {measure!r}: use {', '.join(MEASURES)}")
    return measure


def effect(clean: torch.Tensor, knocked: torch.Tensor, no_image: torch.Tensor, answer_id: int, measure: str) -> torch.Tensor:
    """[N] effect of knockouts on the answer: ``clean`` [V] and ``no_image`` [V] are the last-position
    logits without a knockout and with the full image knockout, ``knocked`` [N, V] under each knockout.
    Unchanged by a constant added to every logit."""
    z, zk = clean.float()[answer_id], knocked.float()[:, answer_id]
    if measure == "prob":
        p = clean.float().softmax(-1)[answer_id].clamp(min=torch.finfo(torch.float32).tiny)
        return knocked.float().softmax(-1)[:, answer_id] / p - 1
    if measure == "logit_diff":
        return zk - z
    full = (no_image.float()[answer_id] - z).abs()
    return (zk - z) / full if full >= MIN_IMAGE_EFFECT else torch.full_like(zk, float("nan"))


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
                     object_mask=None, batch_size: int = 64, measure: str = DEFAULT_MEASURE) -> dict:
    """Effect on the answer (``measure``, see MEASURES) of each edge's knockout, per layer window
    (or per given head mask [C, L, H] when ``head_masks`` is set). Also returns the clean value
    (probability for ``prob``, else the answer logit) and ``image_effect``: the change of the
    answer logit under the full image knockout (image -> all text in all layers)."""
    check_measure(measure)
    ad = get_adapter(model, processor)
    inputs = ad.encode([image], [question])
    aid = ad.answer_token_id(answer, question)
    n_img = int(ad.image_mask(inputs["input_ids"]).sum())
    obj = patch_mask(object_mask, n_img)[None] if object_mask is not None else None
    clean = model(**inputs).logits[0, -1]
    with intervene(model, knockouts=[Knockout("image", "text")]):
        no_image = model(**inputs).logits[0, -1]
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
            knocked = model(**batch).logits[:, -1]
        for (e, c), v in zip(chunk, effect(clean, knocked, no_image, aid, measure).tolist()):
            results.setdefault(e, [0.0] * C)[c] = v
    z = clean.float()[aid]
    shown = clean.float().softmax(-1)[aid] if measure == "prob" else z
    return {"clean": shown.item(), "measure": measure, "effects": results,
            "image_effect": (no_image.float()[aid] - z).item()}


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
                 measure: str = DEFAULT_MEASURE) -> dict:
    """Mean effect (``measure``) per edge and layer window over ``dataset`` rows; when ``heads`` is
    given, also the knockout restricted to those heads (all layers) vs random head sets of the
    same size. Under ``image_frac``, images whose full image knockout moves the answer logit by
    less than MIN_IMAGE_EFFECT are left out of the means and counted in ``excluded_images``."""
    check_measure(measure)
    ad = get_adapter(model, processor)
    wins = windows(ad.num_layers, window)
    per, clean, image_effect = [], [], []
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
        image_effect.append(r["image_effect"])
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
    kept = [k for k, e in enumerate(image_effect) if measure != "image_frac" or abs(e) >= MIN_IMAGE_EFFECT]
    use = [per[k] for k in kept]

    def mean(vals):
        return np.mean(vals, axis=0).tolist() if len(vals) else [float("nan")] * len(wins)

    def stderr(vals):
        return (np.std(vals, axis=0, ddof=1) / np.sqrt(len(vals))).tolist() if len(vals) > 1 else [0.0] * len(wins)

    out = {"windows": [[w[0], w[-1]] for w in wins], "n_images": len(per), "measure": measure,
           "clean_mean": float(np.mean(clean)), "image_effect_mean": float(np.mean(image_effect)),
           "excluded_images": len(per) - len(kept),
           "edges": {e: mean([p[e] for p in use]) for e in edges},
           "stderr": {e: stderr([p[e] for p in use]) for e in edges}}
    if heads is not None:
        rs = [restricted[k] for k in kept]
        out["heads"] = str(heads)
        out["restricted"] = {e: {"attributed": float(np.mean([r[e][0] for r in rs])) if rs else float("nan"),
                                 "random": float(np.mean([np.mean(r[e][1:]) for r in rs])) if rs else float("nan")}
                             for e in edges}
    return out


def format_effect(v: float, measure: str) -> str:
    return f"{v:+.3f}" if measure == "logit_diff" else f"{v:+.1%}"


def describe(flow: dict) -> list[str]:
    """Plain statements of where each edge matters, from the measured numbers."""
    measure = flow.get("measure", "prob")

    def fmt(v):
        return format_effect(v, measure)

    lines = []
    if measure == "prob" and flow.get("clean_mean", 0) > 0.99:
        lines.append(f"- the answer probability is saturated (mean {flow['clean_mean']:.4f}): a knockout barely moves it "
                     "unless the answer flips; `--measure image_frac` or `logit_diff` shows graded effects")
    if "image_effect_mean" in flow:
        lines.append(f"- the full image knockout (image -> all text, all layers) changes the answer logit by "
                     f"{flow['image_effect_mean']:+.3f} on average")
    if flow.get("excluded_images"):
        k = flow["excluded_images"]
        lines.append(f"- {k} image{'s' * (k != 1)} left out: the image knockout moved {'their' if k != 1 else 'its'} answer "
                     f"logit by less than {MIN_IMAGE_EFFECT:g}, so a share of it is undefined")
    wins = flow["windows"]
    for e, vals in flow["edges"].items():
        if all(v != v for v in vals):
            lines.append(f"- {e}: no image to average over")
            continue
        j = int(np.nanargmin(vals))
        w = wins[j]
        where = f"layer {w[0]}" if w[0] == w[1] else f"layers {w[0]}-{w[1]}"
        lines.append(f"- {e}: largest drop {fmt(vals[j])} when knocked out in {where}; "
                     f"per window: " + ", ".join(fmt(v) for v in vals))
    ob = [flow["edges"].get(e, [float("nan")]) for e in ("object->last", "background->last")]
    if not any(all(v != v for v in vals) for vals in ob):
        o, b = np.nanmin(ob[0]), np.nanmin(ob[1])
        lines.append(f"- object vs background patches -> last: strongest drops {fmt(o)} vs {fmt(b)}")
    if "restricted" in flow:
        for e, v in flow["restricted"].items():
            lines.append(f"- {e} knocked out only in the attributed heads ({flow['heads']}): {fmt(v['attributed'])}; "
                         f"in random heads of the same count: {fmt(v['random'])}")
    return lines
