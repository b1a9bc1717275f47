"""What every command shares: the error boundary of a command (``friendly``), the options that load a
model, numbers checked at the command line, and the run options. The subpackages' command modules
import this (the core), never the CLI group above them (headsteer/cli.py)."""
from __future__ import annotations

import functools

import click

from .errors import HeadsteerError


def debug_mode() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get("debug"))


def quiet_mode() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().params.get("quiet"))


def progress_bar(total: int | None, desc: str, unit: str, rank: int = 0):
    """The commands' progress bar: hidden by -q, on every process but rank 0, and where there is nothing
    to count (``total`` None). (tqdm takes an explicit ``disable=`` over TQDM_DISABLE, so a bar that
    passes one must fold -q into it.)"""
    from tqdm import tqdm  # imported when a command runs, not for --help (start-up time)

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet_mode() or rank > 0 or total is None)


def one_line(text) -> str:
    return " ".join(str(text).split())


class UserError(click.ClickException):
    """A one-line error (exit code 1)."""

    def __init__(self, message):
        super().__init__(one_line(message))


def explain(e: BaseException) -> str:
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
            raise UserError(explain(e)) from None

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
