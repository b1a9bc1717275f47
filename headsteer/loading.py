"""Loading real checkpoints and the embedded default model from local directories."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .adapters import get_adapter
from .errors import HeadsteerError
from .families import check_family

DTYPES = {"auto": "auto", "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


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

    >>> import headsteer
    >>> model, processor = headsteer.load("default")              # or headsteer.load("/ckpt/llava-1.5-7b-hf", dtype="bf16")
    >>> headsteer.get_adapter(model, processor).num_layers
    4
    """
    device = check_device(device)
    dtype = check_dtype(dtype, device if device_map is None else _first_gpu(device_map))
    p = resolve_model_path(model)
    try:
        cfg = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise HeadsteerError(f"cannot read {p / 'config.json'}: {e}") from None
    check_family(cfg.model_type, f" in {p}")
    _check_weights(p)
    kw = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kw["dtype"] = dtype
    if device_map is not None:
        kw["device_map"] = device_map
    elif device is not None and torch.device(device).type == "cuda":
        kw["device_map"] = str(device)  # straight onto the GPU: a 7B checkpoint never stages in host memory
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    try:
        m = AutoModelForImageTextToText.from_pretrained(p, use_safetensors=True, **kw)
        m.eval()
        if device is not None and device_map is None:
            m.to(device)
    except HeadsteerError:
        raise
    except torch.OutOfMemoryError:
        raise HeadsteerError(f"{p} does not fit in the memory of {device or 'the device'}: use --device-map auto "
                             "(spreads it over every GPU, then the CPU) or a smaller --dtype") from None
    except Exception as e:
        raise HeadsteerError(f"cannot load model from {p}: {e.__class__.__name__}: {str(e).splitlines()[0]}") from None
    proc = None
    if processor:
        try:
            proc = AutoProcessor.from_pretrained(p, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise HeadsteerError(f"cannot load the processor from {p}: {str(e).splitlines()[0]}") from None
    get_adapter(m, proc)
    return m, proc


def check_device(device):
    """``device`` as a torch.device, or a one-line error when this machine cannot use it."""
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise HeadsteerError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise HeadsteerError(f"--device {device}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                                 "use --device cpu, or install a CUDA build of torch")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise HeadsteerError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                                 f"cuda:{torch.cuda.device_count() - 1}")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise HeadsteerError(f"--device {device}: MPS is not available here; use --device cpu")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise HeadsteerError(f"unsupported device {device!r}: use cpu, cuda, cuda:N or mps")
    return d


def check_dtype(dtype, device):
    """``dtype`` as a torch dtype (or "auto"/None), refusing what the device cannot compute."""
    if dtype is None or not isinstance(dtype, str):
        dt = dtype
    elif dtype in DTYPES:
        dt = DTYPES[dtype]
    else:
        raise HeadsteerError(f"unknown dtype {dtype!r}: use fp32, bf16, fp16 or auto")
    if dt == torch.bfloat16 and device is not None and torch.device(device).type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise HeadsteerError(f"{torch.cuda.get_device_name(device)} cannot compute in bf16: use --dtype fp16 (or fp32)")
    return dt


def _first_gpu(device_map):
    return "cuda" if torch.cuda.is_available() and device_map not in ("cpu",) else None


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HeadsteerError(f"file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise HeadsteerError(f"{path} is not valid JSON: {e}") from None
