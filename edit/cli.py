"""``headsteer edit scale|attn|steer|lora`` and ``headsteer export``."""
from __future__ import annotations

from pathlib import Path

import click
from tqdm import tqdm

from headsteer import get_adapter, load
from headsteer.cli import friendly, load_options
from headsteer.data import load_data
from headsteer.errors import HeadsteerError
from headsteer.heads import select_heads

from .export import export
from .lora import train_head_lora
from .manifest import EditManifest, provenance
from .steer import class_sets, real_vs_blank_sets, steering_vectors
from .tasks import shifted


def resolve_heads(ad, heads, from_attribution, top_k, seed=0):
    """--heads, --from-attribution DIR --top-k K (see ``headsteer.heads.select_heads``)."""
    return select_heads(heads, from_attribution, top_k, num_layers=ad.num_layers, num_heads=ad.num_heads, seed=seed)


def heads_options(f):
    f = click.option("--heads", default=None, help="heads to edit, e.g. L2H0-3,L3H5, or random:K")(f)
    f = click.option("--from-attribution", default=None, help="an attribution run directory (headsteer attribute --out)")(f)
    f = click.option("--top-k", default=4, show_default=True, help="with --from-attribution: take its top K heads")(f)
    f = click.option("--seed", default=0, show_default=True)(f)
    f = click.option("--out", "out", required=True, help="edit manifest to write (JSON)")(f)
    return load_options(f)


def _model_and_heads(model, heads, from_attribution, top_k, seed, device=None, dtype=None, device_map=None):
    m, proc = load(model, device=device, dtype=dtype, device_map=device_map)
    hs, attrib = resolve_heads(get_adapter(m, proc), heads, from_attribution, top_k, seed)
    return m, proc, hs, attrib


def _write(model, proc, kind, heads, attrib, params, out, tensors=None):
    prov = provenance(model, **({"attribution": attrib["run"], "top_k": attrib["top_k"]} if attrib else {}))
    m = EditManifest(kind=kind, heads=str(heads), params=params, provenance=prov)
    if tensors:
        m.with_tensors(tensors)
    m.save(out)
    click.echo(f"wrote {out}: {m.describe()}")
    return m


@click.group()
def edit():
    """Make an edit manifest for the chosen heads."""


@edit.command()
@heads_options
@click.option("--factor", type=float, required=True, help="multiply the heads' outputs (0 = remove the heads, >1 amplify)")
@friendly
def scale(model, device, dtype, device_map, heads, from_attribution, top_k, seed, out, factor):
    """Scale the heads' outputs (baked into o_proj columns on export)."""
    m, proc, hs, attrib = _model_and_heads(model, heads, from_attribution, top_k, seed, device, dtype, device_map)
    _write(m, proc, "scale", hs, attrib, {"factor": factor}, out)


@edit.command()
@heads_options
@click.option("--alpha", type=float, required=True, help="attention probability on image tokens x (1 + alpha), renormalised")
@friendly
def attn(model, device, dtype, device_map, heads, from_attribution, top_k, seed, out, alpha):
    """Scale the heads' attention to image tokens (at inference, also during generation)."""
    if alpha < -1:
        raise HeadsteerError("alpha must be >= -1 (alpha = -1 removes the attention to the image)")
    m, proc, hs, attrib = _model_and_heads(model, heads, from_attribution, top_k, seed, device, dtype, device_map)
    _write(m, proc, "attn", hs, attrib, {"alpha": alpha}, out)


@edit.command()
@heads_options
@click.option("--data", default="easy-vqa:train", show_default=True)
@click.option("--contrast", "contrast", default="real-vs-blank", show_default=True,
              help="real-vs-blank, or classes:A,B (answer A vs answer B)")
@click.option("--n", default=64, show_default=True, help="examples per set")
@click.option("--method", default="mean", type=click.Choice(["mean", "probe"]), show_default=True)
@click.option("--strength", default=1.0, show_default=True, help="multiple of the vector added to each head's output")
@friendly
def steer(model, device, dtype, device_map, heads, from_attribution, top_k, seed, out, data, contrast, n, method, strength):
    """Add a data-derived vector to the heads' outputs."""
    m, proc, hs, attrib = _model_and_heads(model, heads, from_attribution, top_k, seed, device, dtype, device_map)
    ds = load_data(data, limit=None if contrast.startswith("classes:") else n * 2)
    if contrast == "real-vs-blank":
        a, b = real_vs_blank_sets(m, proc, ds, n)
    elif contrast.startswith("classes:"):
        ca, _, cb = contrast.split(":", 1)[1].partition(",")
        a, b = class_sets(ds, ca, cb, n)
    else:
        raise HeadsteerError(f"unknown --contrast {contrast!r}: use real-vs-blank or classes:A,B")
    vec = steering_vectors(m, proc, a, b, method)
    _write(m, proc, "steer", hs, attrib, {"strength": strength, "method": method, "contrast": contrast, "n": [len(a), len(b)]},
           out, {"vectors": vec})


@edit.command()
@heads_options
@click.option("--data", default="easy-vqa:train", show_default=True)
@click.option("--task", default=None, help="shift the data: contrast:C, noise:S or rename:old=new,...")
@click.option("--steps", default=300, show_default=True)
@click.option("--targets", default="q,o", show_default=True, help="projections to adapt (q,k,v,o)")
@click.option("--rank", default=4, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--limit", default=4000, show_default=True, help="training examples to draw from")
@friendly
def lora(model, device, dtype, device_map, heads, from_attribution, top_k, seed, out, data, task, steps, targets, rank, lr, batch_size, limit):
    """Train a LoRA adapter restricted to the heads' q/k/v rows and o_proj columns."""
    m, proc, hs, attrib = _model_and_heads(model, heads, from_attribution, top_k, seed, device, dtype, device_map)
    ds = shifted(load_data(data, limit=limit), task)
    adapter_dir = Path(out).with_suffix("").as_posix() + "_adapter"
    with tqdm(total=steps, desc="lora", unit="step") as bar:
        tensors, params = train_head_lora(m, proc, hs, ds, steps=steps, targets=tuple(targets.split(",")), rank=rank, lr=lr,
                                          batch_size=batch_size, seed=seed, adapter_dir=adapter_dir, progress=bar.update)
    params["task"] = task
    params["data"] = data
    _write(m, proc, "lora", hs, attrib, params, out, tensors)
    click.echo(f"PEFT adapter: {adapter_dir}/  (final loss {params['final_loss']:.4f})")


@click.command("export")
@load_options
@click.option("--edit", "edit_path", required=True, help="edit manifest (JSON)")
@click.option("--out", required=True, help="checkpoint directory to write")
@click.option("--force", is_flag=True, help="replace a non-empty --out")
@friendly
def export_cmd(model, device, dtype, device_map, edit_path, out, force):
    """Write the edited model as a Hugging Face checkpoint."""
    m, proc = load(model, device=device, dtype=dtype, device_map=device_map)
    r = export(m, proc, EditManifest.load(edit_path), out, force=force)
    how = "baked into the weights: loads in plain transformers" if r["baked"] else "saved with its manifest: load with headsteer.load_edited"
    click.echo(f"wrote {out} ({how})")


commands = [edit, export_cmd]
