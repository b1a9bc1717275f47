"""``headsteer edit scale|attn|steer|lora`` and ``headsteer export``.

Library imports (torch, transformers) are inside the commands: `headsteer edit --help` must not
pay for them (start-up time)."""
from __future__ import annotations

from pathlib import Path

import click

from headsteer.cli_options import friendly, load_options, progress_bar
from headsteer.errors import HeadsteerError

from .kinds import KINDS


def resolve_heads(ad, heads, from_attribution, top_k, seed=0, rate=None):
    """--heads, --from-attribution DIR --top-k K [--rate R] (see ``headsteer.heads.select_heads``)."""
    from headsteer.heads import select_heads

    return select_heads(heads, from_attribution, top_k, num_layers=ad.num_layers, num_heads=ad.num_heads, seed=seed, rate=rate,
                        model=ad.model)


def heads_options(f):
    f = click.option("--heads", default=None, help="heads to edit, e.g. L2H0-3,L3H5, or random:K (K heads drawn with --seed)")(f)
    f = click.option("--from-attribution", default=None, help="an attribution run directory (headsteer attribute --out)")(f)
    f = click.option("--rate", default=None,
                     help="with --from-attribution: the ranking of this ablation rate of a multi-rate run (--alpha "
                          "0.1,0.5,0.9), or keep-only / removal for the rate the run found best for it")(f)
    f = click.option("--top-k", default=4, show_default=True, type=click.IntRange(min=1),
                     help="with --from-attribution: take its top K heads (1 to the heads it ranked)")(f)
    f = click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1),
                     help="random seed (random:K heads, LoRA training)")(f)
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
    existing = [q for q in (p, *extra) if q.exists() or q.is_symlink()]
    if existing and not force:
        raise HeadsteerError(f"{existing[0]} exists: pass --force to replace it or choose another --out")
    old = None
    if existing and p.exists():
        from .manifest import EditManifest

        try:
            old = EditManifest.load(p)
        except HeadsteerError:
            raise HeadsteerError(f"{out} exists and is not an edit manifest: headsteer does not replace it, even with "
                                 "--force; choose another --out") from None
    # the files beside the manifest are replaced only where that manifest names them as its own
    named = set()
    if old is not None:
        named = {old.tensors, Path(str(old.params.get("adapter_dir") or "")).name} - {None, ""}
    for q in existing[1:] if existing and existing[0] == p else existing:
        if q.name not in named:
            raise HeadsteerError(f"{q} exists and no edit manifest at {out} names it as its own: headsteer does not replace "
                                 "it, even with --force; move it or choose another --out")
        if q.is_dir():
            from .kinds import check_peft_folder

            check_peft_folder(q)


def _write(model, kind, heads, attrib, params, out, tensors=None):
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


def _kind_command(kind):
    """``headsteer edit <kind>``: the heads options, the kind's own options, and one library call."""

    def run(model, device, dtype, device_map, heads, from_attribution, rate, top_k, seed, out, force, **options):
        from headsteer import get_adapter, load

        from .tasks import check_task

        _check_out(out, force, kind.output_files(out))
        kind.check(out=out, **options)
        check_task(options.get("task"))  # before the model loads
        m, proc = load(model, device=device, dtype=dtype, device_map=device_map)
        hs, attrib = resolve_heads(get_adapter(m, proc), heads, from_attribution, top_k, seed, rate)
        kind.check_options(m, proc, hs, **options)
        with progress_bar(options.get("steps"), kind.name, "step") as bar:
            params, tensors = kind.make(m, proc, hs, out=out, seed=seed, progress=bar.update, **options)
        _write(m, kind.name, hs, attrib, params, out, tensors)
        if "final_loss" in params:
            click.echo(f"PEFT adapter: {Path(out).parent / params['adapter_dir']}/  (final loss {params['final_loss']:.4f})")

    run.__doc__ = kind.help
    cmd = friendly(run)
    for option in reversed(kind.options):
        cmd = option(cmd)
    return click.command(kind.name, help=kind.help)(heads_options(cmd))


for _kind in KINDS.values():
    edit.add_command(_kind_command(_kind))


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

    from .checkpoint import export
    from .manifest import EditManifest

    manifest = EditManifest.load(edit_path)  # a bad manifest fails before the model loads
    m, proc = load(model, device=device, dtype=dtype, device_map=device_map)
    r = export(m, proc, manifest, out, force=force, allow_other_model=allow_other_model)
    how = "baked into the weights: loads in plain transformers" if r["baked"] else "saved with its manifest: load with headsteer.edit.load_edited"
    click.echo(f"wrote {out}/: model.safetensors config.json processor files headsteer_edit.json ({how})")


commands = [edit, export_cmd]
