"""``headsteer edit scale|attn|steer|lora`` and ``headsteer export``.

Library imports (torch, transformers) are inside the commands: `headsteer edit --help` must not
pay for them (start-up time)."""
from __future__ import annotations

from pathlib import Path

import click

from headsteer.cli import FiniteFloat, friendly, load_options, progress_bar
from headsteer.errors import HeadsteerError


def resolve_heads(ad, heads, from_attribution, top_k, seed=0):
    """--heads, --from-attribution DIR --top-k K (see ``headsteer.heads.select_heads``)."""
    from headsteer.heads import select_heads

    ctx = click.get_current_context(silent=True)
    rate = ctx.meta.get("headsteer.rate") if ctx is not None else None
    return select_heads(heads, from_attribution, top_k, num_layers=ad.num_layers, num_heads=ad.num_heads, seed=seed, rate=rate)


def _keep_rate(ctx, _param, value):
    # kept in the context rather than passed through every command's signature
    if value is not None:
        ctx.meta["headsteer.rate"] = value
    return value


def heads_options(f):
    f = click.option("--heads", default=None, help="heads to edit, e.g. L2H0-3,L3H5, or random:K (K heads drawn with --seed)")(f)
    f = click.option("--from-attribution", default=None, help="an attribution run directory (headsteer attribute --out)")(f)
    f = click.option("--rate", default=None, expose_value=False, callback=_keep_rate,
                     help="with --from-attribution: the ranking of this ablation rate of a multi-rate run (--alpha "
                          "0.1,0.5,0.9), or keep-only / removal for the rate the run found best for it")(f)
    f = click.option("--top-k", default=4, show_default=True, type=click.IntRange(min=1),
                     help="with --from-attribution: take its top K heads (1 to the heads it ranked)")(f)
    f = click.option("--seed", default=0, show_default=True, type=int, help="random seed (random:K heads, LoRA training)")(f)
    f = click.option("--out", "out", required=True, help="edit manifest to write (JSON); an existing one needs --force")(f)
    f = click.option("--force", is_flag=True, help="replace an existing --out manifest (and its tensors)")(f)
    return load_options(f)


def _check_out(out, force, extra=()):
    """Before any work: --out must be a writable file path; an existing manifest needs --force."""
    p = Path(out)
    if p.is_dir():
        raise HeadsteerError(f"--out {out} is a folder: give the manifest's file name, e.g. --out {Path(out) / 'edit.json'}")
    if p.suffix.lower() != ".json":
        raise HeadsteerError(f"--out {out}: an edit manifest is a .json file, e.g. --out edit.json")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise HeadsteerError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
            break
    existing = [q for q in (p, *extra) if q.exists()]
    if existing and not force:
        raise HeadsteerError(f"{existing[0]} exists: pass --force to replace it or choose another --out")
    if existing and p.exists():
        from .manifest import EditManifest

        try:
            EditManifest.load(p)
        except HeadsteerError:
            raise HeadsteerError(f"{out} exists and is not an edit manifest: headsteer does not replace it, even with "
                                 "--force; choose another --out") from None


def _model_and_heads(model, heads, from_attribution, top_k, seed, device=None, dtype=None, device_map=None):
    from headsteer import get_adapter, load

    m, proc = load(model, device=device, dtype=dtype, device_map=device_map)
    hs, attrib = resolve_heads(get_adapter(m, proc), heads, from_attribution, top_k, seed)
    return m, proc, hs, attrib


def _write(model, proc, kind, heads, attrib, params, out, tensors=None):
    from .manifest import EditManifest, provenance

    prov = provenance(model, **({"attribution": attrib["run"], "top_k": attrib["top_k"],
                                 **({"attribution_alpha": attrib["alpha"]} if "alpha" in attrib else {})} if attrib else {}))
    m = EditManifest(kind=kind, heads=str(heads), params=params, provenance=prov)
    if tensors:
        m.with_tensors(tensors)
    try:
        m.save(out)
    except OSError as e:
        raise HeadsteerError(f"cannot write {out}: {e.strerror}; choose another --out") from None
    click.echo(f"wrote {out}{' and ' + m.tensors if m.tensors else ''}: {m.describe()}")
    return m


@click.group()
def edit():
    """Make an edit manifest for the chosen heads."""


@edit.command()
@heads_options
@click.option("--factor", type=FiniteFloat(), required=True, help="multiply the heads' outputs (0 = remove the heads, >1 amplify)")
@friendly
def scale(model, device, dtype, device_map, heads, from_attribution, top_k, seed, out, force, factor):
    """Scale the heads' outputs (baked into o_proj columns on export)."""
    _check_out(out, force)
    m, proc, hs, attrib = _model_and_heads(model, heads, from_attribution, top_k, seed, device, dtype, device_map)
    _write(m, proc, "scale", hs, attrib, {"factor": factor}, out)


@edit.command()
@heads_options
@click.option("--alpha", type=FiniteFloat(low=-1.0), required=True,
              help="attention probability on image tokens x (1 + alpha), renormalised; -1 removes it")
@friendly
def attn(model, device, dtype, device_map, heads, from_attribution, top_k, seed, out, force, alpha):
    """Scale the heads' attention to image tokens (at inference, also during generation)."""
    _check_out(out, force)
    m, proc, hs, attrib = _model_and_heads(model, heads, from_attribution, top_k, seed, device, dtype, device_map)
    from headsteer import get_adapter

    ad = get_adapter(m, proc)
    if ad.cross_attention:  # refused now, not later when the edit is applied
        raise HeadsteerError(f"{ad.model_type} reads the image through cross-attention, where every key is "
                             "an image token: attention to the image cannot be scaled; use `edit scale` on these heads")
    _write(m, proc, "attn", hs, attrib, {"alpha": alpha}, out)


@edit.command()
@heads_options
@click.option("--data", default="easy-vqa:train", show_default=True, help="easy-vqa[:split] or a local VQA file/folder")
@click.option("--contrast", "contrast", default="real-vs-blank", show_default=True,
              help="real-vs-blank, or classes:A,B (answer A vs answer B)")
@click.option("--n", default=64, show_default=True, type=click.IntRange(min=1), help="examples per set")
@click.option("--method", default="mean", type=click.Choice(["mean", "probe"]), show_default=True,
              help="mean: difference of the sets' mean head outputs; probe: a logistic probe's direction")
@click.option("--strength", default=1.0, show_default=True, type=FiniteFloat(),
              help="multiple of the vector added to each head's output")
@friendly
def steer(model, device, dtype, device_map, heads, from_attribution, top_k, seed, out, force, data, contrast, n, method, strength):
    """Add a data-derived vector to the heads' outputs."""
    from headsteer.data import load_data

    from .steer import class_sets, real_vs_blank_sets, steering_vectors

    if contrast != "real-vs-blank" and not contrast.startswith("classes:"):
        raise HeadsteerError(f"unknown --contrast {contrast!r}: use real-vs-blank or classes:A,B")
    _check_out(out, force, [Path(out).parent / (Path(out).stem + ".tensors.safetensors")])
    m, proc, hs, attrib = _model_and_heads(model, heads, from_attribution, top_k, seed, device, dtype, device_map)
    ds = load_data(data, limit=None if contrast.startswith("classes:") else n * 2)
    if contrast == "real-vs-blank":
        a, b = real_vs_blank_sets(m, proc, ds, n)
    else:
        ca, _, cb = contrast.split(":", 1)[1].partition(",")
        a, b = class_sets(ds, ca, cb, n)
    vec = steering_vectors(m, proc, a, b, method)
    _write(m, proc, "steer", hs, attrib, {"strength": strength, "method": method, "contrast": contrast, "n": [len(a), len(b)]},
           out, {"vectors": vec})


@edit.command()
@heads_options
@click.option("--data", default="easy-vqa:train", show_default=True, help="easy-vqa[:split] or a local VQA file/folder")
@click.option("--task", default=None, help="shift the data: contrast:C, noise:S or rename:old=new,...  [default: none]")
@click.option("--steps", default=300, show_default=True, type=click.IntRange(min=1), help="optimiser steps")
@click.option("--targets", default="q,o", show_default=True, help="projections to adapt, comma-separated: q, k, v, o")
@click.option("--rank", default=4, show_default=True, type=click.IntRange(min=1), help="LoRA rank")
@click.option("--lr", default=2e-3, show_default=True, type=FiniteFloat(low=0.0, low_open=True), help="learning rate (AdamW)")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="examples per step")
@click.option("--limit", default=4000, show_default=True, type=click.IntRange(min=1), help="training examples to draw from")
@friendly
def lora(model, device, dtype, device_map, heads, from_attribution, top_k, seed, out, force, data, task, steps, targets, rank, lr,
         batch_size, limit):
    """Train a LoRA adapter restricted to the heads' q/k/v rows and o_proj columns."""
    import shutil

    from headsteer.data import load_data

    from .lora import train_head_lora
    from .tasks import shifted

    bad = set(targets.split(",")) - set("qkvo")
    if bad:
        raise HeadsteerError(f"--targets takes q, k, v, o (comma-separated); got {targets!r}")
    adapter_dir = Path(Path(out).with_suffix("").as_posix() + "_adapter")
    _check_out(out, force, [Path(out).parent / (Path(out).stem + ".tensors.safetensors"), adapter_dir])
    if adapter_dir.exists() and not (adapter_dir / "adapter_config.json").exists():
        raise HeadsteerError(f"{adapter_dir} exists and is not a PEFT adapter headsteer wrote: move it or choose another --out")
    m, proc, hs, attrib = _model_and_heads(model, heads, from_attribution, top_k, seed, device, dtype, device_map)
    ds = shifted(load_data(data, limit=limit), task)
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    with progress_bar(steps, "lora", "step") as bar:
        tensors, params = train_head_lora(m, proc, hs, ds, steps=steps, targets=tuple(targets.split(",")), rank=rank, lr=lr,
                                          batch_size=batch_size, seed=seed, adapter_dir=adapter_dir, progress=bar.update)
    params["adapter_dir"] = adapter_dir.name  # relative to the manifest's folder (the only place it may be)
    params["task"] = task
    params["data"] = data
    _write(m, proc, "lora", hs, attrib, params, out, tensors)
    click.echo(f"PEFT adapter: {adapter_dir}/  (final loss {params['final_loss']:.4f})")


@click.command("export")
@load_options
@click.option("--edit", "edit_path", required=True, help="edit manifest (JSON)")
@click.option("--out", required=True, help="checkpoint folder to write (new, empty, or a checkpoint headsteer exported, with --force)")
@click.option("--force", is_flag=True, help="replace a checkpoint headsteer exported there (atomically; nothing else is ever deleted)")
@click.option("--allow-other-model", is_flag=True, help="apply an edit made on other weights than --model's (base_hash differs)")
@friendly
def export_cmd(model, device, dtype, device_map, edit_path, out, force, allow_other_model):
    """Write the edited model as a Hugging Face checkpoint."""
    from headsteer import load

    from .export import export
    from .manifest import EditManifest

    manifest = EditManifest.load(edit_path)  # a bad manifest fails before the model loads
    manifest.allow_other_model = allow_other_model
    m, proc = load(model, device=device, dtype=dtype, device_map=device_map)
    r = export(m, proc, manifest, out, force=force)
    how = "baked into the weights: loads in plain transformers" if r["baked"] else "saved with its manifest: load with headsteer.load_edited"
    click.echo(f"wrote {out}/: model.safetensors config.json processor files headsteer_edit.json ({how})")


commands = [edit, export_cmd]
