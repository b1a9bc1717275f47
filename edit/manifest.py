"""An edit is data: a small JSON manifest (kind, heads, numbers, provenance) plus, for steering and
LoRA, a tensor file beside it. Manifests round-trip: ``EditManifest.load(m.save(path)) == m``.

One schema (each kind's parameters, ``edit/kinds.py``, and ``EditManifest.validate``) checks every
manifest, made in Python or read from a file: field types, finite numbers in range, heads syntax (their range against a model
when applied), and file names confined to the manifest's folder (after resolving symlinks).
``provenance.base_hash`` is an exact fingerprint of the weights the edit was made on
(``headsteer.fingerprint``) and ``provenance.base_hashes`` the same weights cast to each dtype a model
is loaded in; applying the edit to other weights, in whatever dtype, is refused unless asked for
(``check_base``)."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from headsteer import __version__
from headsteer.errors import HeadsteerError
from headsteer.files import save_safetensors, write_json
from headsteer.fingerprint import dtype_name, same_weights, weights_by_dtype, weights_fingerprint
from headsteer.heads import HeadSet
from headsteer.paths import input_dir, input_file, read_text

from .kinds import KINDS

FIELDS = ("kind", "heads", "params", "provenance", "tensors", "baked")
EXACT_HASH = "weights-sha256-v1"  # provenance.base_hash_kind of exact fingerprints (older manifests: sampled)



def _bad(where, msg):
    return HeadsteerError(f"{where}: {msg}" if where else msg)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def confined(base: Path, name, where="", what="path") -> Path:
    """``name`` (relative to ``base``, the manifest's folder) if it stays inside ``base``; else a
    one-line refusal (an edit must not make headsteer read ``~/.ssh``)."""
    if not isinstance(name, str) or not name.strip():
        raise _bad(where, f"{what} must be a file name beside the manifest; got {name!r}")
    p = Path(name).expanduser()
    root = base.resolve()
    target = (p if p.is_absolute() else root / p).resolve()
    if target == root or root not in target.parents:
        link = " (through a symlink)" if (root / p).resolve() != root / p and not p.is_absolute() else ""
        raise _bad(where, f"{what} {name!r} is outside the manifest's folder {root}{link}: an edit may only name files "
                   "beside it; move them there and give the name relative to the manifest")
    return target


def confined_tree(folder: Path, where="", what="folder") -> Path:
    """``folder`` if every entry below it is a regular file or a folder that resolves inside it (no
    symlink out, no pipe or device): a LoRA adapter folder is copied into exported checkpoints."""
    root = input_dir(folder, what).resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            try:
                target = p.resolve(strict=True)
            except (OSError, RuntimeError):
                raise _bad(where, f"{what} holds {p}, a broken symlink or a symlink loop: remove it") from None
            if root not in target.parents:
                raise _bad(where, f"{what} holds {p}, a symlink to {target} outside it: an edit may only hold its own files")
            if name in filenames:
                input_file(p, f"{what} entry")
    return root


@dataclass
class EditManifest:
    kind: str
    heads: str  # HeadSet text
    params: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    tensors: str | None = None  # file name (beside the manifest) holding vectors / LoRA deltas
    baked: bool = False  # True in an exported checkpoint whose weights already carry the edit
    _tensors: dict | None = field(default=None, repr=False, compare=False)
    # set by a caller that knowingly applies the edit to other weights than it was made on
    allow_other_model: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.heads, HeadSet):
            self.heads = str(self.heads)
        if self.params is None:
            self.params = {}
        if self.provenance is None:
            self.provenance = {}
        self.validate()

    def validate(self, where: str = "") -> "EditManifest":
        """The schema: raise a one-line HeadsteerError naming the field and what it takes."""
        if self.kind not in KINDS:
            raise _bad(where, f"unknown edit kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if not isinstance(self.heads, str):
            raise _bad(where, f"heads must be text like \"L2H0-3,L3H5\"; got {self.heads!r}")
        HeadSet.check_syntax(self.heads)  # the syntax now, the range when applied to a model
        if not isinstance(self.params, dict):
            raise _bad(where, f"params must be a JSON object of the edit's numbers; got {self.params!r}")
        if not isinstance(self.provenance, dict):
            raise _bad(where, f"provenance must be a JSON object; got {self.provenance!r}")
        if self.tensors is not None and (not isinstance(self.tensors, str) or Path(self.tensors).name != self.tensors):
            raise _bad(where, f"tensors must be the name of a file beside the manifest; got {self.tensors!r}")
        if not isinstance(self.baked, bool):
            raise _bad(where, f"baked must be true or false; got {self.baked!r}")
        kind = KINDS[self.kind]
        for name, (low, meaning) in kind.params.items():
            if name not in self.params or (name in kind.nullable and self.params[name] is None):
                continue
            v = self.params[name]
            if not _number(v) or not math.isfinite(v):
                raise _bad(where, f"params.{name} ({meaning}) must be a finite number; got {v!r}")
            if low is not None and v < low:
                raise _bad(where, f"params.{name} ({meaning}) must be >= {low}; got {v!r}")
        for name in kind.path_params:
            v = self.params.get(name)
            if v is not None and not isinstance(v, str):
                raise _bad(where, f"params.{name} must be a folder name beside the manifest; got {v!r}")
        return self

    def headset(self, ad) -> HeadSet:
        return HeadSet.parse(self.heads, ad.num_layers, ad.num_heads)

    def describe(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in self.params.items() if not isinstance(v, (dict, list)))
        return f"{self.kind} {self.heads}" + (f" ({p})" if p else "")

    @property
    def tensor_data(self) -> dict:
        return self._tensors or {}

    def with_tensors(self, tensors: dict) -> "EditManifest":
        self._tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return self

    def save(self, path) -> Path:
        """Write the manifest (and its tensors beside it) atomically."""
        path = Path(path)
        if self._tensors:
            self.tensors = path.stem + ".tensors.safetensors"
            save_safetensors(self._tensors, path.parent / self.tensors)
        write_json(path, {k: getattr(self, k) for k in FIELDS})
        return path

    @classmethod
    def load(cls, path) -> "EditManifest":
        path = Path(path)
        if path.is_dir():
            path = path / "headsteer_edit.json"
        if not path.exists() and not path.is_symlink():
            raise HeadsteerError(f"edit manifest not found: {path}")
        try:
            d = json.loads(read_text(path, "edit manifest"))
        except json.JSONDecodeError as e:
            raise HeadsteerError(f"{path} is not a valid edit manifest (JSON error: {e})") from None
        if not isinstance(d, dict):
            raise HeadsteerError(f"{path} is not an edit manifest: it holds a JSON {type(d).__name__}, not an object with "
                                 "kind and heads (make one with `headsteer edit`)")
        missing = {"kind", "heads"} - set(d)
        if missing:
            raise HeadsteerError(f"{path} is not an edit manifest: missing {', '.join(sorted(missing))}")
        m = cls.__new__(cls)
        m.kind, m.heads, m.params, m.provenance = d["kind"], d["heads"], d.get("params", {}), d.get("provenance", {})
        m.tensors, m.baked, m._tensors, m.allow_other_model = d.get("tensors"), d.get("baked", False), None, False
        m.validate(str(path))
        for name in KINDS[m.kind].path_params:  # e.g. a LoRA's PEFT adapter: only beside the manifest
            if m.params.get(name) is not None:
                confined(path.parent, m.params[name], str(path), f"params.{name}")
        if m.tensors:
            # resolved and checked: a tensors file that is a symlink out of the folder is refused
            tp = input_file(confined(path.parent, m.tensors, str(path), "tensors"), "the edit's tensors file")
            try:
                m._tensors = load_file(str(tp))
            except Exception as e:
                raise HeadsteerError(f"cannot read the edit's tensors {tp}: {e}") from None
        m._source = path
        return m

    def adapter_path(self) -> Path | None:
        """The LoRA's PEFT adapter folder (inside the manifest's folder), if the manifest names one."""
        name = self.params.get("adapter_dir")
        src = getattr(self, "_source", None)
        if not name:
            return None
        if src is None:  # made in this process (train_head_lora's folder), not read from a file
            return Path(name)
        try:
            p = confined(src.parent, name, str(src), "params.adapter_dir")
        except HeadsteerError:
            # older manifests recorded the folder as given on the command line (relative to the
            # working directory); accepted only where that is inside the manifest's folder too
            p = Path(name).expanduser().resolve()
            if src.parent.resolve() not in p.parents:
                raise
        return confined_tree(p, str(src), "the LoRA adapter folder") if p.exists() else p

    def check_base(self, model, allow_other_model: bool = False) -> None:
        """Refuse weights other than those the edit was made on (``provenance.base_hash``), unless
        ``allow_other_model`` (here or on the manifest). Baked checkpoints carry the edit in their
        weights: nothing to check."""
        base = self.provenance.get("base_hash")
        if not base or self.baked or self.allow_other_model or allow_other_model:
            return
        prov = self.provenance
        if prov.get("base_hash_kind") == EXACT_HASH:
            # base_hashes: the base cast to each dtype, so weights loaded in another dtype compare too
            same = same_weights(model, prov.get("base_hashes"), base, prov.get("base_dtype"))
        else:
            same = sampled_fingerprint(model) == base
        mine = dtype_name(model)
        if same is None:
            raise HeadsteerError(f"this edit records its base weights in {prov.get('base_dtype')} only (made by an older "
                                 f"headsteer), which cannot be compared with this model's {mine}: apply it under --dtype "
                                 f"{prov.get('base_dtype')}, remake it with `headsteer edit`, or pass --allow-other-model")
        if not same:
            made = prov.get("base_model") or "another model"
            raise HeadsteerError(f"this edit was made on other weights ({made}; base_hash {base[:12]}…, this model "
                                 f"{weights_fingerprint(model)[:12]}… in {mine}): apply it to that model, or pass "
                                 "--allow-other-model (allow_other_model=True) to apply it anyway")


def load_manifest(path) -> EditManifest:
    return EditManifest.load(path)


def sampled_fingerprint(model) -> str:
    """The base_hash of manifests before exact fingerprints: a hash of a strided sample of every
    tensor (kept to check those manifests)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        h.update(name.encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


model_fingerprint = sampled_fingerprint  # the old name


def provenance(model, attribution: str | None = None, top_k: int | None = None, **extra) -> dict:
    p = {
        "base_model": str(getattr(model, "name_or_path", "") or model.config._name_or_path),
        "base_hash": weights_fingerprint(model),
        "base_hash_kind": EXACT_HASH,
        "base_dtype": dtype_name(model),
        # the base weights cast to each dtype: the edit is checked against them in whatever dtype it is applied
        "base_hashes": weights_by_dtype(model),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "headsteer": __version__,
    }
    if attribution:
        p["attribution"] = {"run": str(attribution), "top_k": top_k}
    p.update(extra)
    return p
