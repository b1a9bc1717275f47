"""Export an edited model as a Hugging Face checkpoint (safetensors, config, processor files and
the manifest). Weight-expressible edits are baked in, so the directory loads in plain
transformers; the others keep the base weights and ``headsteer.load_edited`` re-applies them.
Writes go to a temporary directory that is renamed into place."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from headsteer.adapters import get_adapter
from headsteer.errors import HeadsteerError
from headsteer.load import load

from .apply import _weights_added, install_edit, lora_deltas, spec_for
from .manifest import EditManifest

# Text backbones whose o_proj takes a bias when config.attention_bias is set.
_BIAS_FAMILIES = {"llama", "mistral", "gemma", "gemma2", "gemma3_text", "granite", "olmo2"}
MANIFEST_NAME = "headsteer_edit.json"


@contextlib.contextmanager
def _scaled_columns(ad, mask, factor):
    saved = {}
    try:
        with torch.no_grad():
            for l in range(ad.num_layers):
                heads = mask[l].nonzero().squeeze(-1).tolist()
                if not heads:
                    continue
                w = ad.out_proj(l).weight
                saved[l] = w.detach().clone()
                for h in heads:
                    w[:, h * ad.head_dim : (h + 1) * ad.head_dim] *= factor
        yield
    finally:
        with torch.no_grad():
            for l, w0 in saved.items():
                ad.out_proj(l).weight.copy_(w0)


def can_bake_steering(ad) -> bool:
    tcfg = ad.text_config
    return getattr(tcfg, "model_type", "") in _BIAS_FAMILIES and hasattr(tcfg, "attention_bias")


@contextlib.contextmanager
def _steering_bias(ad, add):
    """o_proj(x + a) = W x + W a: the head vectors become an o_proj bias (q/k/v get zero biases,
    because ``attention_bias`` gives every projection one)."""
    tcfg = ad.text_config
    old_flag = tcfg.attention_bias
    created = []
    try:
        tcfg.attention_bias = True
        with torch.no_grad():
            for l, attn in enumerate(ad.attention):
                for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    lin = getattr(attn, name)
                    if lin.bias is None:
                        lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
                        created.append(lin)
                o = ad.out_proj(l)
                o.bias.add_((o.weight.float() @ add[l].reshape(-1).to(o.weight.device)).to(o.bias.dtype))
        yield
    finally:
        tcfg.attention_bias = old_flag
        for lin in created:
            lin.bias = None


def _edited_weights(model, manifest, ad):
    """Context in which the model's weights carry the edit, or None if it is not weight-expressible."""
    mask = manifest.headset(ad).to_mask(ad.num_layers, ad.num_heads)
    if manifest.kind == "scale":
        return _scaled_columns(ad, mask, float(manifest.params.get("factor", 0.0)))
    if manifest.kind == "lora":
        return _weights_added(model, lora_deltas(manifest, model))
    if manifest.kind == "steer" and can_bake_steering(ad):
        return _steering_bias(ad, spec_for(manifest, ad).head_add)
    return None


def export(model, processor, manifest: EditManifest, out_dir, force: bool = False) -> dict:
    """Write the edited checkpoint to ``out_dir``; returns {"baked": bool, "path": str}."""
    ad = get_adapter(model, processor)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise HeadsteerError(f"{out} exists and is not empty: choose another --out or pass --force to replace it")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ctx = _edited_weights(model, manifest, ad)
        baked = ctx is not None
        with ctx if baked else contextlib.nullcontext():
            model.save_pretrained(tmp, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        adapter = manifest.params.get("adapter_dir")
        if manifest.kind == "lora" and adapter and Path(adapter).is_dir():
            shutil.copytree(adapter, tmp / "lora_adapter")
        saved = EditManifest(kind=manifest.kind, heads=manifest.heads, params=dict(manifest.params),
                             provenance=dict(manifest.provenance), baked=baked)
        if not baked and manifest.tensor_data:
            saved.with_tensors(manifest.tensor_data)
        saved.save(tmp / MANIFEST_NAME)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"baked": baked, "path": str(out)}


def load_edited(path, **load_kwargs):
    """Load an exported checkpoint; edits that are not in its weights are re-applied (installed)."""
    model, processor = load(path, **load_kwargs)
    mp = Path(path) / MANIFEST_NAME
    if mp.exists():
        manifest = EditManifest.load(mp)
        model._headsteer_edit = manifest
        if not manifest.baked:
            install_edit(model, manifest, processor)
    return model, processor
