"""Baseline image keys/values that an ablated head reads instead of the real ones.

``zero``: zeros. ``blank``: the keys/values the model computes for a blank (mean-grey) image.
``mean``: the mean keys/values per layer, KV head and image position over a reference set of
images. Keys are taken after rotary embedding, indexed by image-token ordinal, so they fit any
prompt whose image tokens sit where the reference prompts' did. In a cross-attention family the
keys/values are those of each cross-attention layer, indexed by key position (tile and patch).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open

from .adapters import get_adapter
from .data import easy_vqa_images
from .errors import HeadsteerError
from .files import save_safetensors
from .fingerprint import config_fingerprint, processor_fingerprint, weights_fingerprint
from .intervention import intervene, is_intervened
from .paths import input_file

KINDS = ("mean", "blank", "zero")


class Baseline:
    kind = "?"

    def kv(self, layer, key, value, img, ordinals=None, n_img=None):
        """``key``/``value`` [B, Hkv, T, d] with the image positions (bool [B, T]) replaced.
        ``ordinals`` (long [B, T]) says which image token each position holds and ``n_img`` how many
        the prompt has: a sliding-window cache may hold only the last ones of a row."""
        if ordinals is None:
            counts = img.sum(1)
            if not bool((counts == counts[0]).all()):
                raise HeadsteerError(
                    f"the rows of this batch have {counts.tolist()} image positions; a baseline needs the same number in "
                    "every row: use baseline='zero', or images of one size")
            ordinals, n_img = img.long().cumsum(1) - 1, int(counts[0])
        kb, vb = self.image_kv(layer, n_img, key.dtype, key.device)
        return _place(key, img, ordinals, kb), _place(value, img, ordinals, vb)

    def image_kv(self, layer, n_img, dtype, device):
        """Baseline (k, v), each [Hkv, n_img, d]."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind}


def _place(x, img, ordinals, base):
    xt = x.transpose(1, 2).clone()  # [B, T, Hkv, d]
    xt[img] = base.transpose(0, 1)[ordinals[img]].to(x.dtype)
    return xt.transpose(1, 2)


class ZeroBaseline(Baseline):
    kind = "zero"

    def __init__(self, num_kv_heads, head_dim):
        self.shape = (num_kv_heads, head_dim)

    def image_kv(self, layer, n_img, dtype, device):
        z = torch.zeros(self.shape[0], n_img, self.shape[1], dtype=dtype, device=device)
        return z, z


class TensorBaseline(Baseline):
    """Per-layer K/V [L, Hkv, n_img, d] (mean or blank)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, kind: str, meta: dict | None = None):
        self.keys, self.values, self.kind, self.meta = keys, values, kind, meta or {}
        self._on_device: dict = {}

    def image_kv(self, layer, n_img, dtype, device):
        if self.keys.shape[2] != n_img:
            raise HeadsteerError(
                f"the {self.kind} baseline has {self.keys.shape[2]} image positions, this input has {n_img}; "
                "recompute it for this image size or use baseline='zero'"
            )
        key = (layer, str(device), dtype)
        if key not in self._on_device:  # once per layer/device/dtype, not once per forward
            self._on_device[key] = (self.keys[layer].to(device, dtype), self.values[layer].to(device, dtype))
        return self._on_device[key]

    def describe(self) -> dict:
        return {"kind": self.kind, **self.meta}

    def save(self, path):
        save_safetensors({"keys": self.keys, "values": self.values}, path,
                         metadata={"kind": self.kind, "meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path):
        try:
            with safe_open(str(path), "pt") as f:
                md = f.metadata()
                return cls(f.get_tensor("keys"), f.get_tensor("values"), md["kind"], json.loads(md.get("meta", "{}")))
        except Exception as e:
            raise HeadsteerError(f"cannot read baseline {path}: {e}; delete it to recompute") from None


@torch.no_grad()
def capture_image_kv(model, processor, images, questions, batch_size=16):
    """Mean over ``images`` of each layer's K/V at image positions: ([L, Hkv, n, d], [L, Hkv, n, d])
    as fp32 on the host (in a cross-attention family: at every key of the cross-attention layers).
    The forward runs under the precision policy (fp32 attention arithmetic), as every ablated
    forward does."""
    ad = get_adapter(model, processor)
    ksum = vsum = None
    n = 0
    for i in range(0, len(images), batch_size):
        ims, qs = images[i : i + batch_size], questions[i : i + batch_size]
        inputs = ad.encode(ims, qs)
        img = ad.image_mask(inputs["input_ids"])
        cap = {}
        with intervene(model, capture=cap, fp32_attention=True):
            model(**inputs, logits_to_keep=1)
        ks, vs = [], []
        for layer in range(ad.num_layers):
            k, v = cap[layer]
            if ad.cross_attention:  # every key is an image feature
                ks.append(k.float().sum(0))
                vs.append(v.float().sum(0))
                continue
            B, H, T, d = k.shape
            ks.append(k.transpose(1, 2)[img].view(B, -1, H, d).transpose(1, 2).float().sum(0))
            vs.append(v.transpose(1, 2)[img].view(B, -1, H, d).transpose(1, 2).float().sum(0))
        k, v = torch.stack(ks), torch.stack(vs)
        ksum = k if ksum is None else ksum + k
        vsum = v if vsum is None else vsum + v
        n += len(ims)
    return (ksum / n).cpu(), (vsum / n).cpu()


def blank_image(processor):
    ip = getattr(processor, "image_processor", None)
    mean = getattr(ip, "image_mean", None) or [0.5, 0.5, 0.5]
    size = getattr(ip, "crop_size", None) or getattr(ip, "size", None) or {"height": 224, "width": 224}
    h = size.get("height") or size.get("shortest_edge") or 224
    w = size.get("width") or size.get("shortest_edge") or 224
    return Image.new("RGB", (w, h), tuple(int(round(255 * m)) for m in mean))


def _model_hash(model) -> str:
    # every weight (a sample of the first tensors missed edits of the language model), not the path
    return f"{weights_fingerprint(model)}|{config_fingerprint(model)}"


def make_baseline(model, processor, kind="mean", reference=None, question="what is in the image?", cache_dir=None, n_reference=64):
    """Build a baseline. ``reference``: list of PIL images for ``mean`` (default: easy-VQA train images).

    ``mean`` baselines are cached as safetensors under ``cache_dir`` (default
    ``~/.cache/headsteer``) keyed by model, reference set and prompt — except while an
    intervention is active on the model (e.g. a hook edit): no fingerprint of the weights sees it,
    so that baseline is computed afresh and not cached.
    """
    ad = get_adapter(model, processor)
    if isinstance(kind, Baseline):
        return kind
    if kind == "zero":
        return ZeroBaseline(ad.num_kv_heads, ad.head_dim)
    if kind == "blank":
        k, v = capture_image_kv(model, processor, [blank_image(processor)], [question])
        return TensorBaseline(k, v, "blank", {"image": "mean colour of the image processor"})
    if kind != "mean":
        raise HeadsteerError(f"unknown baseline {kind!r}: use one of {', '.join(KINDS)}")
    if reference is None:
        paths = easy_vqa_images("train")
        ids = sorted(paths)[:n_reference]
        reference = [Image.open(paths[i]).convert("RGB") for i in ids]
        ref_name = f"easy-vqa:train[:{n_reference}]"
    else:
        ref_name = f"user({len(reference)})"
        h = hashlib.sha1()
        for im in reference:
            h.update(im.tobytes())
        ref_name += ":" + h.hexdigest()[:10]
    proc_hash = processor_fingerprint(processor if processor is not None else ad.processor)
    key = hashlib.sha256(f"{_model_hash(model)}|{proc_hash}|{ref_name}|{question}".encode()).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("HEADSTEER_CACHE", Path.home() / ".cache" / "headsteer"))
    path = cache / f"baseline-mean-{key}.safetensors"
    cacheable = not is_intervened(model)
    if cacheable and (path.exists() or path.is_symlink()):
        input_file(path, "cached baseline")
        return TensorBaseline.load(path)
    if cacheable:
        _check_cache(cache)  # before the work, not after it
    k, v = capture_image_kv(model, processor, reference, [question] * len(reference))
    b = TensorBaseline(k, v, "mean", {"reference": ref_name, "n": len(reference), "question": question})
    if cacheable:
        try:
            b.save(path)
        except OSError as e:
            raise HeadsteerError(f"cannot write the baseline cache in {cache} ({e.strerror or e}): "
                                 f"{_CACHE_FIX}") from None
    return b


_CACHE_FIX = "set HEADSTEER_CACHE to a folder you can write (default ~/.cache/headsteer)"


def _check_cache(cache: Path):
    """The baseline cache folder exists (made if not) and is writable: a one-line error naming it
    and HEADSTEER_CACHE, not a temporary file's name or the file that is in the way."""
    where = f"the baseline cache {cache}" + (" (HEADSTEER_CACHE)" if os.environ.get("HEADSTEER_CACHE") else "")
    if cache.exists() and not cache.is_dir():
        raise HeadsteerError(f"{where} is a file, not a folder: {_CACHE_FIX}")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HeadsteerError(f"cannot create {where} ({e.strerror or e}): {_CACHE_FIX}") from None
    if not os.access(cache, os.W_OK | os.X_OK):
        raise HeadsteerError(f"{where} is not writable: {_CACHE_FIX}")


def as_baseline(model, processor, baseline, dataset=None) -> Baseline:
    """A Baseline from a name. The ``mean`` reference set is the easy-VQA train images for easy-VQA
    data and otherwise the data set's own first 64 distinct images (so that the image size, and
    with it the number of image tokens, matches what is ablated)."""
    if isinstance(baseline, Baseline):
        return baseline
    reference = None
    if baseline == "mean" and dataset is not None and "image_id" not in dataset.column_names:
        seen, reference = set(), []
        for i in range(min(len(dataset), 256)):
            im = dataset[i]["image"]
            key = hashlib.sha1(im.tobytes()).hexdigest()
            if key not in seen:
                seen.add(key)
                reference.append(im)
            if len(reference) == 64:
                break
    return make_baseline(model, processor, baseline, reference=reference)
