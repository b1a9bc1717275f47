"""``headsteer`` command line: the top layer. Each command is a few lines over one library function,
in its subpackage's ``cli`` module; this group imports that module when the command is asked for.

Start-up: ``headsteer --help`` lists the commands from ``COMMANDS`` below without importing them, and a
command's module is imported only when that command runs (or shows its ``--help``); command modules
import torch/transformers inside their functions for the same reason.

One error boundary (``_Group.main``): bad input ends in one line naming the fix and exit code 1
(2 for usage errors), never a traceback unless ``--debug``."""
from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from .cli_options import explain, friendly, load_options, one_line
from .parallel import finish_processes

log = logging.getLogger("headsteer")

# name -> (module, attribute, short help) of the subpackages' commands: the group lists this table
# instead of importing every command (tests/test_cli_speed.py checks it against each command's own help)
COMMANDS = {
    "attribute": ("headsteer.attribution.cli", "attribute",
                  "Rank heads by how much the answer depends on the image flowing through them (COAR, or gradients)."),
    "flow": ("headsteer.attribution.flow_cli", "flow", "Attention knockout between token groups, layer window by layer window."),
    "edit": ("headsteer.edit.cli", "edit", "Make an edit manifest for the chosen heads."),
    "export": ("headsteer.edit.cli", "export_cmd", "Write the edited model as a Hugging Face checkpoint."),
    "eval": ("headsteer.eval.cli", "eval_cmd",
             "VQA accuracy and cross-modal transfer (resumable; data-parallel under accelerate launch)."),
    "compare": ("headsteer.eval.cli", "compare",
                "Evaluate the unedited model and each edit on the same examples; table, plot, HTML report."),
    "export-task": ("headsteer.eval.cli", "export_task_cmd",
                    "Write VQA data as local files plus an lmms-eval task that scores it as eval does."),
    "ask": ("headsteer.eval.ask", "ask_cmd", "Answer one question about one image (and show an edit's effect)."),
}


class _Group(click.Group):
    """The subpackages' commands (``COMMANDS``), each imported only when asked for."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is None and name in COMMANDS:
            module, attr, _ = COMMANDS[name]
            cmd = getattr(importlib.import_module(module), attr)
            self.add_command(cmd, name)
        return cmd

    def format_commands(self, ctx, formatter):
        rows = []
        for name in self.list_commands(ctx):
            if name in COMMANDS and name not in self.commands:
                rows.append((name, COMMANDS[name][2]))
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
            click.echo(f"Error: {one_line(explain(e))}", err=True)
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
