"""Loading real checkpoints and the embedded default model from local directories."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import HeadsteerError


def default_model_path() -> str:
    """Directory of the embedded default checkpoint (a small LLaVA trained on easy-VQA)."""
    return str(Path(__file__).resolve().parent / "default_model")


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    if model in (None, "", "default"):
        return Path(default_model_path())
    p = Path(model).expanduser()
    if not p.exists():
        raise HeadsteerError(f"model directory not found: {p} (give a local checkpoint directory; hub downloads are off)")
    if not (p / "config.json").exists():
        raise HeadsteerError(f"{p} has no config.json: point --model at a Hugging Face checkpoint directory")
    return p


def _check_weights(p: Path):
    shards = list(p.glob("*.safetensors"))
    if not shards:
        bins = list(p.glob("*.bin"))
        hint = " (it has .bin files: convert them to safetensors; pickled weights are not loaded)" if bins else ""
        raise HeadsteerError(f"{p} holds no .safetensors weights{hint}")
    from safetensors import safe_open

    for s in shards:
        if s.name.startswith("baseline-"):
            continue
        try:
            with safe_open(str(s), "pt") as f:
                f.keys()
        except Exception as e:
            raise HeadsteerError(f"corrupt checkpoint file {s}: {e}; re-export or re-download it") from None


def load(model: str | os.PathLike | None = "default", *, dtype=None, device=None, device_map=None,
         trust_remote_code: bool = False, attn_implementation: str | None = None, processor: bool = True):
    """``model, processor = headsteer.load("default" | local_dir)``.

    Safetensors only; ``trust_remote_code`` stays off unless asked. The vision tower keeps SDPA;
    the text model gets ``attn_implementation`` (default: SDPA), which ``intervene`` wraps.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .adapters import FAMILIES, get_adapter, supported_families

    p = resolve_model_path(model)
    try:
        cfg = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise HeadsteerError(f"cannot read {p / 'config.json'}: {e}") from None
    if cfg.model_type not in FAMILIES:
        raise HeadsteerError(f"unsupported architecture {cfg.model_type!r} in {p}; supported: {supported_families()}")
    _check_weights(p)
    kw = {"trust_remote_code": trust_remote_code}
    if isinstance(dtype, str):
        dtype = {"auto": "auto", "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[dtype]
    if dtype is not None:
        kw["dtype"] = dtype
    if device_map is not None:
        kw["device_map"] = device_map
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    try:
        m = AutoModelForImageTextToText.from_pretrained(p, use_safetensors=True, **kw)
    except HeadsteerError:
        raise
    except Exception as e:
        raise HeadsteerError(f"cannot load model from {p}: {e.__class__.__name__}: {str(e).splitlines()[0]}") from None
    m.eval()
    if device is not None and device_map is None:
        m.to(device)
    proc = None
    if processor:
        try:
            proc = AutoProcessor.from_pretrained(p, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise HeadsteerError(f"cannot load the processor from {p}: {str(e).splitlines()[0]}") from None
    get_adapter(m, proc)
    return m, proc


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HeadsteerError(f"file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise HeadsteerError(f"{path} is not valid JSON: {e}") from None
