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
from .paths import check_folder_entries, input_dir, input_file, read_text

DTYPES = {"auto": "auto", "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def default_model_path() -> str:
    """Directory of the embedded default checkpoint (a small LLaVA trained on easy-VQA)."""
    return str(Path(__file__).resolve().parent / "default_model")


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    if model in (None, "", "default"):
        return Path(default_model_path())
    p = Path(model).expanduser()
    if not p.exists() and not p.is_symlink():
        raise HeadsteerError(f"model directory not found: {p} (give a local checkpoint directory; hub downloads are off)")
    input_dir(p, "model directory")  # a symlink loop or a file is named as such
    if not (p / "config.json").exists() and not (p / "config.json").is_symlink():
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


SAVED_EDIT = "headsteer_edit.json"  # the manifest headsteer.edit.export writes into a checkpoint


def _check_saved_edit(p: Path):
    """A checkpoint exported with an edit that is not in its weights must not load as if it had none."""
    mp = p / SAVED_EDIT
    if not mp.exists() and not mp.is_symlink():
        return
    try:
        d = json.loads(read_text(mp, "the checkpoint's edit manifest"))
    except json.JSONDecodeError:
        d = None
    if not isinstance(d, dict) or not isinstance(d.get("baked", False), bool):
        raise HeadsteerError(f"{mp} is not a readable edit manifest, so whether this checkpoint's edit is in its weights is "
                             "unknown: fix or remove it")
    if not d.get("baked", False):
        raise HeadsteerError(f"{p} was exported with a {d.get('kind')} edit that is not in its weights ({SAVED_EDIT}, "
                             "baked: false): loading it alone would drop the edit; load it with "
                             "headsteer.edit.load_edited (the eval, compare and ask commands do)")


def _check_loading_info(p: Path, info: dict):
    """Every tensor the model has came from the checkpoint and every tensor there went into the model:
    transformers initialises missing ones at random and ignores the rest (only warning), and then the
    model answers with random layers. Tied weights (``tie_word_embeddings``) are not reported missing."""
    problems = []
    for key, what in (("missing_keys", "missing from the weights"), ("unexpected_keys", "in the weights but not in the model"),
                      ("mismatched_keys", "of another shape than the config says")):
        keys = sorted(k[0] if isinstance(k, tuple) else k for k in info.get(key) or ())
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            if key == "mismatched_keys":
                first = next(k for k in sorted(info[key]) if isinstance(k, tuple))
                shown += f" (e.g. {first[0]}: weights {tuple(first[1])}, config {tuple(first[2])})" if len(first) == 3 else ""
            problems.append(f"{len(keys)} tensor(s) {what}: {shown}")
    if info.get("error_msgs"):
        problems.append(" ".join(str(info["error_msgs"][0]).split())[:160])
    if problems:
        raise HeadsteerError(f"{p}: config.json and the weights do not match — " + "; ".join(problems) + ": use the "
                             "config.json saved with these weights (or the weights of this config)")


def load(model: str | os.PathLike | None = "default", *, dtype=None, device=None, device_map=None,
         trust_remote_code: bool = False, attn_implementation: str | None = None, processor: bool = True,
         allow_saved_edit: bool = False):
    """``model, processor = headsteer.load("default" | local_dir)``.

    Safetensors only; ``trust_remote_code`` stays off unless asked. The vision tower keeps SDPA;
    the text model gets ``attn_implementation`` (default: SDPA), which ``intervene`` wraps. Strict:
    a tensor missing from the weights, left over, or of another shape than the config says is a
    one-line error naming it. A checkpoint exported with an edit not baked into its weights is
    refused (load it with ``headsteer.edit.load_edited``; ``allow_saved_edit``: the caller applies it).

    >>> import headsteer
    >>> model, processor = headsteer.load("default")              # or headsteer.load("/ckpt/llava-1.5-7b-hf", dtype="bf16")
    >>> headsteer.get_adapter(model, processor).num_layers
    4
    """
    device = check_device(device)
    dtype = check_dtype(dtype, device if device_map is None else _first_gpu(device_map))
    p = resolve_model_path(model)
    check_folder_entries(p, "model folder")  # nothing there blocks or loops when transformers opens it
    input_file(p / "config.json", "model config")
    if not allow_saved_edit:
        _check_saved_edit(p)
    try:
        cfg = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise HeadsteerError(f"cannot read {p / 'config.json'}: {' '.join(str(e).split())[:200]}") from None
    check_family(cfg.model_type, f" in {p}")
    _check_weights(p)
    # mismatched shapes are reported in the loading info (and refused below, naming them) instead of
    # raising transformers' advice to pass ignore_mismatched_sizes
    kw = {"trust_remote_code": trust_remote_code, "output_loading_info": True, "ignore_mismatched_sizes": True}
    if dtype is not None:
        kw["dtype"] = dtype
    if device_map is not None:
        kw["device_map"] = device_map
    elif device is not None and torch.device(device).type == "cuda":
        kw["device_map"] = str(device)  # straight onto the GPU: a 7B checkpoint never stages in host memory
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    try:
        m, info = AutoModelForImageTextToText.from_pretrained(p, use_safetensors=True, **kw)
        _check_loading_info(p, info)
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
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise HeadsteerError(f"{path} is not valid JSON: {e}") from None
