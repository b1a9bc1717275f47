"""An edit is data: a small JSON manifest (kind, heads, numbers, provenance) plus, for steering and
LoRA, a tensor file beside it. Manifests round-trip: ``EditManifest.load(m.save(path)) == m``."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from headsteer import __version__
from headsteer.errors import HeadsteerError
from headsteer.files import save_safetensors, write_json
from headsteer.heads import HeadSet

KINDS = ("scale", "attn", "steer", "lora")
WEIGHT_EXPRESSIBLE = {"scale", "lora"}  # steer too where o_proj can take a bias (see export)


@dataclass
class EditManifest:
    kind: str
    heads: str  # HeadSet text
    params: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    tensors: str | None = None  # file name (beside the manifest) holding vectors / LoRA deltas
    baked: bool = False  # True in an exported checkpoint whose weights already carry the edit
    _tensors: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise HeadsteerError(f"unknown edit kind {self.kind!r}: use one of {', '.join(KINDS)}")
        self.heads = str(HeadSet.parse(self.heads)) if not isinstance(self.heads, str) else self.heads
        HeadSet.check_syntax(self.heads)  # the syntax now, the range when applied to a model

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
        write_json(path, {k: v for k, v in asdict(self).items() if not k.startswith("_")})
        return path

    @classmethod
    def load(cls, path) -> "EditManifest":
        path = Path(path)
        if path.is_dir():
            path = path / "headsteer_edit.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise HeadsteerError(f"edit manifest not found: {path}") from None
        except json.JSONDecodeError as e:
            raise HeadsteerError(f"{path} is not a valid edit manifest (JSON error: {e})") from None
        missing = {"kind", "heads"} - set(d)
        if missing:
            raise HeadsteerError(f"{path} is not an edit manifest: missing {', '.join(sorted(missing))}")
        m = cls(**{k: d[k] for k in ("kind", "heads", "params", "provenance", "tensors", "baked") if k in d})
        if m.tensors:
            tp = path.parent / m.tensors
            try:
                m._tensors = load_file(str(tp))
            except Exception as e:
                raise HeadsteerError(f"cannot read the edit's tensors {tp}: {e}") from None
        return m


def load_manifest(path) -> EditManifest:
    return EditManifest.load(path)


def model_fingerprint(model) -> str:
    """A cheap, deterministic hash of the weights (a strided sample of every tensor)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        h.update(name.encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def provenance(model, attribution: str | None = None, top_k: int | None = None, **extra) -> dict:
    p = {
        "base_model": str(getattr(model, "name_or_path", "") or model.config._name_or_path),
        "base_hash": model_fingerprint(model),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "headsteer": __version__,
    }
    if attribution:
        p["attribution"] = {"run": str(attribution), "top_k": top_k}
    p.update(extra)
    return p
