"""``headsteer`` command line: each command is a few lines over one library function."""
from __future__ import annotations

import functools

import click

from .errors import HeadsteerError
from .plugins import registered


def friendly(fn):
    """Bad input ends in one line naming the fix, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except HeadsteerError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def qtype_filter(qtype, data):
    """Question types to keep: the object-identification (shape) questions of easy-VQA by default."""
    if qtype is None:
        qtype = "shape" if (data or "easy-vqa").startswith("easy-vqa") else "all"
    return None if qtype == "all" else tuple(qtype.split(","))


model_opt = click.option("--model", default="default", show_default=True, help="'default' (embedded easy-VQA LLaVA) or a local checkpoint directory")
device_opt = click.option("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")
dtype_opt = click.option("--dtype", default=None, type=click.Choice(["fp32", "bf16", "fp16", "auto"]),
                         help="weights dtype (default: as saved in the checkpoint); attention arithmetic is fp32 whatever it is")
device_map_opt = click.option("--device-map", default=None,
                              help="'auto' spreads a model larger than one GPU over every GPU, then the CPU (accelerate)")


def load_options(f):
    """--model, --device, --dtype and --device-map: every command loads its model the same way."""
    return model_opt(device_opt(dtype_opt(device_map_opt(f))))
force_opt = click.option("--force", is_flag=True,
                         help="--out holds another run: delete that run's own files (nothing else) and start over")


class _Group(click.Group):
    """The subpackages' commands come from entry points (group ``headsteer.commands`` in
    pyproject.toml): the core names no subpackage, and a command's module is imported only when
    that command is asked for."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(registered("headsteer.commands")))

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is None:
            ep = registered("headsteer.commands").get(name)
            if ep is not None:
                cmd = ep.load()
                self.add_command(cmd, name)
        return cmd


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="headsteer")
def main():
    """Find the attention heads that carry image information into a VLM's answer, and edit them."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    from .parallel import finish_processes

    click.get_current_context().call_on_close(finish_processes)


@main.command()
@load_options
@friendly
def info(model, device, dtype, device_map):
    """Architecture facts: layers, query/KV heads, image tokens per image."""
    from . import load
    from .adapters import get_adapter

    m, proc = load(model, device=device, dtype=dtype, device_map=device_map)
    ad = get_adapter(m, proc)
    click.echo(f"model       {model}")
    click.echo(f"family      {ad.model_type} ({type(m).__name__})")
    click.echo(f"layers      {ad.num_layers}")
    click.echo(f"heads       {ad.num_heads} query / {ad.num_kv_heads} KV per layer, head_dim {ad.head_dim}")
    click.echo(f"parameters  {sum(p.numel() for p in m.parameters()):,}")
    click.echo(f"image token id {ad.image_token_id}; prompt: {ad.prompt('{question}')!r}")
