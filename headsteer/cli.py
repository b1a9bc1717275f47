"""``headsteer`` command line: each command is a few lines over one library function.

Start-up: ``headsteer --help`` lists the commands from ``COMMANDS`` below without importing them,
and a command's module is imported only when that command runs (or shows its ``--help``); command
modules import torch/transformers inside their functions for the same reason.

One error boundary (``_Group.main``): bad input ends in one line naming the fix and exit code 1
(2 for usage errors), never a traceback unless ``--debug``."""
from __future__ import annotations

import functools
import logging
import os
import sys

import click

from .errors import HeadsteerError
from .parallel import finish_processes
from .plugins import registered

log = logging.getLogger("headsteer")

# name -> short help of the subpackages' commands (entry points, group ``headsteer.commands``):
# the group listing reads this table instead of importing every command (tests/test_cli_speed.py
# checks it against each command's own help).
COMMANDS = {
    "attribute": "Rank heads by how much the answer depends on the image flowing through them (COAR).",
    "flow": "Attention knockout between token groups, layer window by layer window.",
    "edit": "Make an edit manifest for the chosen heads.",
    "export": "Write the edited model as a Hugging Face checkpoint.",
    "eval": "VQA accuracy and cross-modal transfer (resumable; data-parallel under accelerate launch).",
    "compare": "Evaluate the unedited model and each edit on the same examples; table, plot, HTML report.",
    "ask": "Answer one question about one image (and show an edit's effect).",
}


def debug_mode() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get("debug"))


def quiet_mode() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get("quiet"))


def progress_bar(total: int, desc: str, unit: str, rank: int = 0):
    """The commands' progress bar: hidden by -q and on every process but rank 0. (tqdm takes an explicit
    ``disable=`` over TQDM_DISABLE, so a bar that passes one must fold -q into it.)"""
    from tqdm import tqdm  # imported when a command runs, not for --help (start-up time)

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet_mode() or rank > 0)


def one_line(text) -> str:
    return " ".join(str(text).split())


class UserError(click.ClickException):
    """A one-line error (exit code 1)."""

    def __init__(self, message):
        super().__init__(one_line(message))


def _explain(e: BaseException) -> str:
    """One line for an exception a user can cause outside headsteer's own checks."""
    if isinstance(e, HeadsteerError):
        return str(e)
    if isinstance(e, IsADirectoryError):
        return f"{e.filename} is a folder, not a file: give a file path"
    if isinstance(e, NotADirectoryError):
        return f"{e.filename} (or a folder above it) is a file, not a folder: choose another path"
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename}; choose a path you can write (or read)"
    if isinstance(e, FileNotFoundError):
        return f"not found: {e.filename}"
    if isinstance(e, OSError):
        return f"{e.strerror or e}: {e.filename}" if e.filename else f"{e}"
    return (f"unexpected {type(e).__name__}: {e} — rerun with `headsteer --debug ...` for the traceback and "
            "report it if the input was valid")


def friendly(fn):
    """Bad input ends in one line naming the fix, not a traceback (the traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except click.ClickException:
            raise
        except (HeadsteerError, OSError) as e:
            if debug_mode():
                raise
            raise UserError(_explain(e)) from None

    return wrapper


def qtype_filter(qtype, data):
    """Question types to keep: the object-identification (shape) questions of easy-VQA by default."""
    if qtype is None:
        qtype = "shape" if (data or "easy-vqa").startswith("easy-vqa") else "all"
    return None if qtype == "all" else tuple(qtype.split(","))


model_opt = click.option("--model", default="default", show_default=True, help="'default' (embedded easy-VQA LLaVA) or a local checkpoint directory")
device_opt = click.option("--device", default=None, help="cpu, cuda, cuda:N or mps  [default: cpu]")
dtype_opt = click.option("--dtype", default=None, type=click.Choice(["fp32", "bf16", "fp16", "auto"]),
                         help="weights dtype  [default: as saved in the checkpoint]; attention arithmetic is fp32 whatever it is")
device_map_opt = click.option("--device-map", default=None,
                              help="'auto' spreads a model larger than one GPU over every GPU, then the CPU (accelerate)  [default: none]")


def load_options(f):
    """--model, --device, --dtype and --device-map: every command loads its model the same way."""
    return model_opt(device_opt(dtype_opt(device_map_opt(f))))


class FiniteFloat(click.ParamType):
    """A finite number (no nan/inf), optionally within [low, high]."""

    name = "float"

    def __init__(self, low: float | None = None, high: float | None = None, low_open: bool = False):
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value, param, ctx):
        import math

        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            self.fail(f"{value} must be {'>' if self.low_open else '>='} {self.low}", param, ctx)
        if self.high is not None and v > self.high:
            self.fail(f"{value} must be <= {self.high}", param, ctx)
        return v

    def get_metavar(self, param, ctx=None):
        lo = "" if self.low is None else f"{self.low}{'<' if self.low_open else '<='}"
        hi = "" if self.high is None else f"<={self.high}"
        return f"FLOAT {lo}x{hi}" if lo or hi else "FLOAT"


self_check_opt = click.option("--no-self-check", "no_self_check", is_flag=True,
                              help="skip the engine's check on the first example (identity, fast == naive, cached "
                                   "generation == full forwards): for those who know why")
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

    def format_commands(self, ctx, formatter):
        rows = []
        for name in self.list_commands(ctx):
            if name in COMMANDS and name not in self.commands:
                rows.append((name, COMMANDS[name]))
                continue
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=200)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """The error boundary: one line on stderr, exit code 1 (2 for usage errors); the traceback
        only under --debug."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv[: next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))]
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            click.echo(f"Error: {one_line(e.format_message())}{where}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"Error: {one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except Exception as e:
            if debug:
                raise
            click.echo(f"Error: {one_line(_explain(e))}", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _verbosity(verbose: int, quiet: bool):
    """-q: warnings and errors only, no progress bars; default: info; -v: debug."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    log.setLevel(logging.DEBUG)  # the run folder's headsteer.log gets everything
    console = next((h for h in log.handlers if getattr(h, "_headsteer_console", False)), None)
    if console is None:
        console = logging.StreamHandler()
        console._headsteer_console = True
        console.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(console)
        log.propagate = False
    console.setLevel(level)
    if quiet:
        # other libraries' bars (datasets' map, ...): tqdm reads its defaults from TQDM_* variables; put
        # back when the command ends, so that -q of one in-process call does not silence the next
        old = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"
        ctx = click.get_current_context(silent=True)
        if ctx is not None:
            ctx.call_on_close(lambda: _restore_env("TQDM_DISABLE", old))


def _restore_env(name: str, value: str | None):
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="headsteer")
@click.option("--debug", is_flag=True, help="show the Python traceback of an error instead of one line")
@click.option("-v", "--verbose", count=True, help="more detail on the console (debug messages)")
@click.option("-q", "--quiet", is_flag=True, help="no progress bars, warnings and errors only")
def main(debug, verbose, quiet):
    """Find the attention heads that carry image information into a VLM's answer, and edit them.

    Every run folder (--out) also gets headsteer.log, the full log of its runs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _verbosity(verbose, quiet)
    # transformers is not imported here (seconds at start-up, and `<command> --help` runs this
    # callback too): it reads these variables when a command imports it
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (in-process callers, tests)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()

    click.get_current_context().call_on_close(_finish)


def _finish():
    # a process group exists only where torch was imported (not for --help: start-up time)
    if "torch" in sys.modules:
        finish_processes()


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
    kind = " (cross-attention layers)" if ad.cross_attention else " (attention layers)" if ad.hybrid else ""
    click.echo(f"layers      {ad.num_layers}{kind}")
    click.echo(f"heads       {ad.num_heads} query / {ad.num_kv_heads} KV per layer, head_dim {ad.head_dim}")
    click.echo(f"parameters  {sum(p.numel() for p in m.parameters()):,}")
    click.echo(f"image token id {ad.image_token_id}; prompt: {ad.prompt('{question}')!r}")
    import transformers

    from .versions import range_text, tested_range

    spec = tested_range()
    click.echo(f"transformers {transformers.__version__} (headsteer tested {range_text(spec) if spec else 'unknown: not installed as a package'})")
