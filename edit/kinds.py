"""Edit kinds, each one class registered once (the way PEFT registers its tuners): its parameters (the
manifest schema), how it acts on a loaded model (an intervention ``Spec``, or a change of weights),
how it bakes into plain weights for export (or why it cannot), and its ``headsteer edit <kind>``
options and how they make its numbers. The manifest schema, ``apply_edit``, ``export`` and the CLI
loop over ``KINDS``; adding a kind is one class here (docs/contributing.md).

torch, transformers and the kinds' algorithms are imported inside the methods: the CLI reads this
registry to build `headsteer edit <kind> --help`, which must not pay for them (start-up time).
"""
from __future__ import annotations

import contextlib
from typing import ClassVar

import click

from headsteer.cli_options import FiniteFloat
from headsteer.errors import HeadsteerError

KINDS: dict[str, "EditKind"] = {}


def register(cls):
    KINDS[cls.name] = cls()
    return cls


def kind_of(name: str) -> "EditKind":
    if name not in KINDS:
        raise HeadsteerError(f"unknown edit kind {name!r}: use one of {', '.join(KINDS)}")
    return KINDS[name]


class EditKind:
    """One kind of edit. A manifest's ``params`` hold its numbers; ``tensors`` its arrays."""

    name: ClassVar[str]
    help: ClassVar[str]  # the `headsteer edit <kind>` command's help
    # numeric parameter -> (lowest allowed value or None, what it means); every number must be finite
    params: ClassVar[dict[str, tuple]] = {}
    nullable: ClassVar[tuple] = ()  # numeric parameters that may be null
    path_params: ClassVar[tuple] = ()  # parameters naming files, confined to the manifest's folder
    options: ClassVar[list] = []  # click options of `headsteer edit <kind>` besides the heads options

    def spec(self, manifest, ad):
        """The intervention ``Spec`` of the edit, or None where it is a change of weights."""
        return None

    def weights(self, manifest, model, ad):
        """A context in which the model's weights carry the edit, or None where no weights can."""
        return None

    def applied(self, manifest, model, ad):
        """The context of ``apply_edit``: the edit's intervention, or its weights; restored on exit.
        ``label``: the edit's fingerprint, which a run folder records while the edit is installed."""
        from headsteer.fingerprint import edit_fingerprint
        from headsteer.intervention import intervene

        spec = self.spec(manifest, ad)
        if spec is not None:
            return intervene(model, spec, label=edit_fingerprint(manifest))
        return self.weights(manifest, model, ad)

    def not_bakeable(self, ad) -> str | None:
        """Why the edit cannot be baked into plain weights of this model (None: it can)."""
        return None

    def check(self, **options) -> None:
        """Refuse bad options in one line before any model loads (the CLI calls this first)."""

    def output_files(self, out) -> list:
        """Files ``headsteer edit <kind> --out OUT`` writes besides OUT (what --force may replace)."""
        return []

    def check_options(self, model, processor, heads, **options) -> None:
        """Refuse bad options in one line before ``make`` starts its work (and its progress bar)."""

    def make(self, model, processor, heads, *, out, seed: int = 0, progress=None, **options) -> tuple[dict, dict | None]:
        """The manifest's (params, tensors) from the command's options (``out``: the manifest's path,
        ``seed``: the command's --seed, ``progress``: called with the steps done, for a progress bar)."""
        raise NotImplementedError


def head_columns(ad, mask):
    """{layer: [head indices]} of a bool [L, H] mask, layers with none left out."""
    return {l: mask[l].nonzero().squeeze(-1).tolist() for l in range(ad.num_layers) if bool(mask[l].any())}


@register
class Scale(EditKind):
    name = "scale"
    help = "Scale the heads' outputs (baked into o_proj columns on export)."
    params = {"factor": (None, "the heads' output multiplier")}
    options = [click.option("--factor", type=FiniteFloat(), required=True,
                            help="multiply the heads' outputs (0 = remove the heads, >1 amplify)")]

    def spec(self, manifest, ad):
        import torch

        from headsteer.spec import Spec

        s = torch.ones(ad.num_layers, ad.num_heads)
        s[manifest.headset(ad).to_mask(ad.num_layers, ad.num_heads)] = float(manifest.params.get("factor", 0.0))
        return Spec(head_scale=s)

    @contextlib.contextmanager
    def weights(self, manifest, model, ad):
        # o_proj(x * f on a head's slice) = the o_proj columns of that head times f
        import torch

        factor = float(manifest.params.get("factor", 0.0))
        saved = {}
        try:
            with torch.no_grad():
                for l, heads in head_columns(ad, manifest.headset(ad).to_mask(ad.num_layers, ad.num_heads)).items():
                    w = ad.out_proj(l).weight
                    saved[l] = w.detach().clone()
                    for h in heads:
                        w[:, h * ad.head_dim : (h + 1) * ad.head_dim] *= factor
            yield
        finally:
            with torch.no_grad():
                for l, w0 in saved.items():
                    ad.out_proj(l).weight.copy_(w0)

    def make(self, model, processor, heads, *, factor, **_):
        return {"factor": factor}, None


@register
class Attn(EditKind):
    name = "attn"
    help = "Scale the heads' attention to image tokens (at inference, also during generation)."
    params = {"alpha": (-1.0, "image attention x (1 + alpha); -1 removes it")}
    options = [click.option("--alpha", type=FiniteFloat(low=-1.0), required=True,
                            help="attention probability on image tokens x (1 + alpha), renormalised; -1 removes it")]

    def spec(self, manifest, ad):
        import torch

        from headsteer.spec import Spec

        f = torch.ones(ad.num_layers, ad.num_heads)
        f[manifest.headset(ad).to_mask(ad.num_layers, ad.num_heads)] = 1.0 + float(manifest.params.get("alpha", 0.0))
        return Spec(image_attn=f)

    def not_bakeable(self, ad):
        return "attention to the image is scaled per prompt layout, which no weight expresses"

    def make(self, model, processor, heads, *, alpha, **_):
        from headsteer.adapters import get_adapter

        ad = get_adapter(model, processor)
        if ad.cross_attention:  # refused now, not later when the edit is applied
            raise HeadsteerError(f"{ad.model_type} reads the image through cross-attention, where every key is "
                                 "an image token: attention to the image cannot be scaled; use `edit scale` on these heads")
        return {"alpha": alpha}, None


@register
class Steer(EditKind):
    name = "steer"
    help = "Add a data-derived vector to the heads' outputs."
    params = {"strength": (None, "multiple of the steering vector")}
    options = [
        click.option("--data", default="easy-vqa:train", show_default=True, help="easy-vqa[:split] or a local VQA file/folder"),
        click.option("--contrast", "contrast", default="real-vs-blank", show_default=True,
                     help="real-vs-blank, or classes:A,B (answer A vs answer B)"),
        click.option("--n", default=64, show_default=True, type=click.IntRange(min=1), help="examples per set"),
        click.option("--method", default="mean", type=click.Choice(["mean", "probe"]), show_default=True,
                     help="mean: difference of the sets' mean head outputs; probe: a logistic probe's direction"),
        click.option("--strength", default=1.0, show_default=True, type=FiniteFloat(),
                     help="multiple of the vector added to each head's output"),
    ]

    def output_files(self, out):
        from pathlib import Path

        return [Path(out).parent / (Path(out).stem + ".tensors.safetensors")]

    def added(self, manifest, ad):
        """float [L, H, head_dim]: what the edit adds to each head's output. Only the manifest's heads
        get their vectors: values the file holds for other heads are masked out (ignored), so the
        heads the manifest names are the only ones the edit can change."""
        import torch

        L, H = ad.num_layers, ad.num_heads
        vec = manifest.tensor_data.get("vectors")
        if vec is None:
            raise HeadsteerError("steer edit has no vectors: build it with `headsteer edit steer` or steering_vectors()")
        if tuple(vec.shape) != (L, H, ad.head_dim):
            raise HeadsteerError(f"steering vectors have shape {tuple(vec.shape)}; this model needs [{L}, {H}, {ad.head_dim}]")
        if not torch.isfinite(vec.float()).all():
            raise HeadsteerError("the steering vectors hold NaN or infinite values: remake the edit with `headsteer edit steer`")
        mask = manifest.headset(ad).to_mask(L, H)
        add = torch.zeros(L, H, ad.head_dim)
        add[mask] = float(manifest.params.get("strength", 1.0)) * vec[mask].float()
        return add

    def spec(self, manifest, ad):
        from headsteer.spec import Spec

        return Spec(head_add=self.added(manifest, ad))

    def not_bakeable(self, ad):
        from .bias import o_proj_bias_flag

        if o_proj_bias_flag(ad) is None:
            return (f"{type(ad.attention[0]).__name__}'s output projection takes no bias from any config flag, so the "
                    "added vectors cannot be an o_proj bias")
        return None

    def weights(self, manifest, model, ad):
        from .bias import steering_bias

        return None if self.not_bakeable(ad) else steering_bias(ad, self.added(manifest, ad))

    def check(self, *, contrast, **_):
        if contrast != "real-vs-blank" and not contrast.startswith("classes:"):
            raise HeadsteerError(f"unknown --contrast {contrast!r}: use real-vs-blank or classes:A,B")

    def make(self, model, processor, heads, *, data, contrast, n, method, strength, **_):
        from headsteer.data import load_data

        from .steer import class_sets, real_vs_blank_sets, steering_vectors

        self.check(contrast=contrast)
        ds = load_data(data, limit=None if contrast.startswith("classes:") else n * 2)
        if contrast == "real-vs-blank":
            a, b = real_vs_blank_sets(model, processor, ds, n)
        else:
            ca, _, cb = contrast.split(":", 1)[1].partition(",")
            a, b = class_sets(ds, ca, cb, n)
        vec = steering_vectors(model, processor, a, b, method)
        return {"strength": strength, "method": method, "contrast": contrast, "n": [len(a), len(b)]}, {"vectors": vec}


@register
class Lora(EditKind):
    name = "lora"
    help = "Train a LoRA adapter restricted to the heads' q/k/v rows and o_proj columns."
    params = {"scaling": (None, "LoRA scale"), "rank": (1, "LoRA rank")}
    nullable = ("scaling",)  # a LoRA that adapted no module has no scale
    path_params = ("adapter_dir",)
    options = [
        click.option("--data", default="easy-vqa:train", show_default=True, help="easy-vqa[:split] or a local VQA file/folder"),
        click.option("--task", default=None, help="shift the data: contrast:C, noise:S or rename:old=new,...  [default: none]"),
        click.option("--steps", default=300, show_default=True, type=click.IntRange(min=1), help="optimiser steps"),
        click.option("--targets", default="q,o", show_default=True, help="projections to adapt, comma-separated: q, k, v, o"),
        click.option("--rank", default=4, show_default=True, type=click.IntRange(min=1), help="LoRA rank"),
        click.option("--lr", default=2e-3, show_default=True, type=FiniteFloat(low=0.0, low_open=True), help="learning rate (AdamW)"),
        click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="examples per step"),
        click.option("--limit", default=4000, show_default=True, type=click.IntRange(min=1), help="training examples to draw from"),
    ]

    def output_files(self, out):
        from pathlib import Path

        return [Path(out).parent / (Path(out).stem + ".tensors.safetensors"), adapter_dir_of(out)]

    def check(self, *, targets, out, **_):
        if set(targets.split(",")) - set("qkvo"):
            raise HeadsteerError(f"--targets takes q, k, v, o (comma-separated); got {targets!r}")
        adapter_dir = adapter_dir_of(out)
        if adapter_dir.exists() and not (adapter_dir / "adapter_config.json").exists():
            raise HeadsteerError(f"{adapter_dir} exists and is not a PEFT adapter headsteer wrote: move it or choose another --out")

    def weights(self, manifest, model, ad):
        from .apply import lora_deltas, weights_added

        return weights_added(model, lora_deltas(manifest, model, ad))

    def check_options(self, model, processor, heads, *, targets, rank, task=None, **_):
        from headsteer.adapters import get_adapter

        from .lora import check_rank
        from .tasks import check_task

        if set(targets.split(",")) - set("qkvo"):
            raise HeadsteerError(f"--targets takes q, k, v, o (comma-separated); got {targets!r}")
        check_task(task)
        check_rank(get_adapter(model, processor), heads, tuple(targets.split(",")), rank)

    def make(self, model, processor, heads, *, data, task, steps, targets, rank, lr, batch_size, limit, out, seed=0, progress=None,
             **_):
        from headsteer.data import load_data

        from .lora import train_head_lora
        from .tasks import shifted

        self.check_options(model, processor, heads, targets=targets, rank=rank, task=task)
        adapter_dir = adapter_dir_of(out)
        ds = shifted(load_data(data, limit=limit), task)
        if adapter_dir.exists():
            remove_peft_folder(adapter_dir)
        tensors, params = train_head_lora(model, processor, heads, ds, steps=steps, targets=tuple(targets.split(",")), rank=rank,
                                          lr=lr, batch_size=batch_size, seed=seed, adapter_dir=adapter_dir, progress=progress)
        params["adapter_dir"] = adapter_dir.name  # relative to the manifest's folder (the only place it may be)
        params["task"] = task
        params["data"] = data
        return params, tensors


PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")  # what PEFT's save_pretrained writes


def check_peft_folder(folder):
    """A LoRA adapter folder that ``--force`` may replace holds only the files PEFT writes."""
    from pathlib import Path

    other = sorted(p.name for p in Path(folder).iterdir() if p.name not in PEFT_FILES or not p.is_file() or p.is_symlink())
    if other:
        raise HeadsteerError(f"{folder} holds files PEFT did not write ({', '.join(other[:3])}): headsteer does not replace "
                             "it, even with --force; move them or choose another --out")


def remove_peft_folder(folder):
    """Delete a LoRA adapter folder headsteer wrote (PEFT's files only; anything else refuses)."""
    from pathlib import Path

    check_peft_folder(folder)
    for name in PEFT_FILES:
        (Path(folder) / name).unlink(missing_ok=True)
    Path(folder).rmdir()


def adapter_dir_of(out):
    from pathlib import Path

    return Path(Path(out).with_suffix("").as_posix() + "_adapter")
