"""Exact content fingerprints of what determines a run's numbers: the weights, the processor, an
edit manifest, the data rows.

Weights are hashed where they live: each tensor's bits are read as integers and reduced to a
position-weighted sum in int64. Integer addition wraps mod 2^64 and is associative, so the value
is the same on CPU and GPU and for any reduction order, and nothing but one number per tensor
crosses to the host. Every weight has an odd multiplier, so changing any single weight always
changes the sum."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from .errors import HeadsteerError
from .paths import input_file, read_text

_CHUNK = 1 << 22  # elements per step: bounds the int64 temporaries to a few tens of MB


def _i64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_M1, _M2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9)
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


_weights_cache: dict = {}


def _position_weights(device) -> torch.Tensor:
    """Odd int64 weights for the positions in a chunk (splitmix64-style mixing of the index;
    arithmetic shifts and wrapping products are defined the same way on every device)."""
    key = str(device)
    if key not in _weights_cache:
        w = torch.arange(_CHUNK, device=device, dtype=torch.int64) * _M1
        w = w ^ (w >> 31)
        w = w * _M2
        w = w ^ (w >> 29)
        _weights_cache[key] = w | 1
    return _weights_cache[key]


def _chunk_weight(k: int) -> int:
    # odd too: a change in one element moves the total by (odd * odd * delta) != 0 mod 2^64
    return _i64((((k + 1) * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)) | 1)


@torch.no_grad()
def tensor_fingerprint(t: torch.Tensor, cast: torch.dtype | None = None) -> int:
    """The position-weighted int64 sum of a tensor's bits (see the module docstring); with ``cast``
    (a floating dtype), of the bits of a floating tensor cast to it, chunk by chunk (bounded memory)."""
    if t.device.type == "meta":
        return 0
    if t.is_complex():
        t = torch.view_as_real(t)
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if cast is not None and not flat.is_floating_point():
        cast = None
    size = (torch.empty((), dtype=cast) if cast is not None else flat).element_size()
    weights = _position_weights(flat.device)
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for k, start in enumerate(range(0, flat.numel(), _CHUNK)):
        part = flat[start : start + _CHUNK]
        if cast is not None:
            part = part.to(cast)
        chunk = part.contiguous().view(_INT_VIEW[size]).to(torch.int64)
        total += (chunk * weights[: chunk.numel()]).sum() * _chunk_weight(k)
    return int(total.item())


def _persistent_tensors(model):
    """Parameters and the buffers a checkpoint holds (non-persistent buffers such as rotary
    frequencies are derived from the config and may be computed differently per device)."""
    seen = set()
    for name, p in model.named_parameters():
        seen.add(id(p))
        yield name, p
    for mod_name, mod in model.named_modules():
        skip = getattr(mod, "_non_persistent_buffers_set", set())
        for bname, b in mod._buffers.items():
            if b is None or bname in skip or id(b) in seen:
                continue
            seen.add(id(b))
            yield f"{mod_name}.{bname}" if mod_name else bname, b


def weights_fingerprint(model, cast: torch.dtype | str | None = None) -> str:
    """sha256 over (name, shape, dtype, content sum) of every parameter and persistent buffer. With
    ``cast``, every floating tensor is hashed as if cast to that dtype: the same checkpoint loaded in
    fp32 and in bf16 gives one value when both are cast to bf16 (``from_pretrained`` casts the same
    way, round to nearest even), so weights can be compared across the dtypes they are loaded in."""
    if isinstance(cast, str):
        cast = getattr(torch, cast)
    h = hashlib.sha256()
    for name, t in sorted(_persistent_tensors(model), key=lambda x: x[0]):
        dt = cast if cast is not None and t.is_floating_point() else t.dtype
        h.update(f"{name}|{tuple(t.shape)}|{dt}|{t.device.type == 'meta'}|{tensor_fingerprint(t, cast)}\n".encode())
    return h.hexdigest()


FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a model is loaded in (--dtype)


def dtype_name(model) -> str | None:
    """The dtype of the model's first parameter, as torch names it without ``torch.`` (None: no parameter)."""
    p = next(model.parameters(), None)
    return str(p.dtype).replace("torch.", "") if p is not None else None


def weights_by_dtype(model) -> dict[str, str]:
    """``weights_fingerprint(model, cast=d)`` for each dtype a model is loaded in: what a record of
    these weights compares against whichever dtype they are loaded in later (``same_weights``)."""
    return {d: weights_fingerprint(model, cast=d) for d in FLOAT_DTYPES}


def same_weights(model, by_dtype: dict | None = None, exact: str | None = None, exact_dtype: str | None = None) -> bool | None:
    """Whether ``model`` holds the weights of a record: True, False, or None where the record cannot
    tell. ``by_dtype``: the record's ``weights_by_dtype``; ``exact``/``exact_dtype``: a plain
    ``weights_fingerprint`` and the dtype it was taken in (older records hold only that).

    Every part of the record that can be compared must agree: ``by_dtype`` in the model's own dtype
    (the record cast to it), and ``exact`` in the same dtype, or cast down to it from a finer model
    (fp32 holds bf16/fp16 exactly); a model coarser than ``exact_dtype`` cannot be compared with it."""
    mine = dtype_name(model)
    verdicts = []
    if isinstance(by_dtype, dict) and by_dtype.get(mine):
        verdicts.append(weights_fingerprint(model, cast=mine) == by_dtype[mine])
    if exact and exact_dtype in (None, mine):
        verdicts.append(weights_fingerprint(model) == exact)
    elif exact and mine == "float32" and exact_dtype in FLOAT_DTYPES:
        verdicts.append(weights_fingerprint(model, cast=exact_dtype) == exact)
    return None if not verdicts else all(verdicts)


_CONFIG_VOLATILE = {"transformers_version", "dtype", "torch_dtype", "name_or_path"}


def _stable(obj):
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if not str(k).startswith("_") and k not in _CONFIG_VOLATILE}
    if isinstance(obj, (list, tuple)):
        return [_stable(v) for v in obj]
    return obj


def config_fingerprint(model) -> str:
    """The architecture's numbers (rope, eps, sizes ...) without the path, dtype or the attention
    implementation chosen at run time."""
    d = _stable(model.config.to_dict())
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def processor_fingerprint(processor) -> str:
    """sha256 of the processor's serialised config, tokenizer and chat template."""
    if processor is None:
        return "none"
    parts = []
    for obj in (processor, getattr(processor, "tokenizer", None), getattr(processor, "image_processor", None)):
        if obj is None:
            continue
        to_json = getattr(obj, "to_json_string", None)
        if callable(to_json):
            try:
                parts.append(to_json())
            except Exception:  # tokenizers without a JSON form are covered by their vocabulary below
                pass
        parts.append(str(getattr(obj, "chat_template", None)))
    tok = getattr(processor, "tokenizer", processor)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        # padding/truncation are per-call state the tokenizer keeps from its last batch
        tj = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        parts.append(json.dumps(tj, sort_keys=True))
    elif hasattr(tok, "get_vocab"):
        parts.append(json.dumps(sorted(tok.get_vocab().items())))
        parts.append(json.dumps(getattr(tok, "special_tokens_map", {}), sort_keys=True, default=str))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def edit_fingerprint(edit) -> str | None:
    """Content hash of an edit: kind, heads, parameters, whether baked, and its tensors (not its
    provenance, which holds a creation time). ``edit``: an ``EditManifest``-like object or the
    path of a manifest JSON (its tensor file is read beside it); None for no edit."""
    if edit is None:
        return None
    if isinstance(edit, (str, Path)):
        from safetensors.torch import load_file

        path = Path(edit)
        d = json.loads(read_text(path, "edit manifest"))
        body = {k: d.get(k) for k in ("kind", "heads", "params")}
        body["baked"] = bool(d.get("baked", False))
        tensors = {}
        if d.get("tensors"):
            tp = (path.parent / str(d["tensors"])).resolve()
            if path.parent.resolve() not in tp.parents:  # as EditManifest.load: only files beside the manifest
                raise HeadsteerError(f"{path}: tensors {d['tensors']!r} is outside the manifest's folder")
            tensors = load_file(str(input_file(tp, "the edit's tensors file")))
    else:
        body = {"kind": edit.kind, "heads": edit.heads, "params": edit.params, "baked": bool(getattr(edit, "baked", False))}
        tensors = getattr(edit, "tensor_data", None) or {}
    # the same value for a manifest in memory and the file it was saved to
    h = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode())
    for name, t in sorted(tensors.items()):
        h.update(f"|{name}|{tuple(t.shape)}|{t.dtype}|{tensor_fingerprint(t)}".encode())
    return h.hexdigest()


def rows_fingerprint(dataset, n: int | None = None) -> str:
    """sha256 of the first ``n`` rows of a ``datasets.Dataset`` as stored (images as their encoded
    bytes, so nothing is decoded): the rows a run reads, whatever the loader or the transforms."""
    import pyarrow as pa

    n = len(dataset) if n is None else min(n, len(dataset))
    table = dataset.with_format("arrow")[0:n]
    table = table.take(pa.array(range(table.num_rows), pa.int64()))  # compact buffers: same bytes for the same rows
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()
