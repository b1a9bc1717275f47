"""``headsteer flow``."""
from __future__ import annotations

import os
from pathlib import Path

import click

from headsteer.heads import select_heads
from headsteer.cli import device_opt, force_opt, friendly, model_opt, qtype_filter
from headsteer.files import write_json, write_text
from headsteer.rundir import open_run, run_identity

FLOW_OUTPUTS = ("flow.json", "flow.png", "summary.md")


def heads_option_value(heads, from_attribution, top_k, ad):
    if not heads and not from_attribution:
        return None
    return select_heads(heads, from_attribution, top_k, num_layers=ad.num_layers, num_heads=ad.num_heads)[0]


def plot_flow(out: Path, flow: dict):
    import matplotlib

    from .flow import MEASURES

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [w[0] if w[0] == w[1] else (w[0] + w[1]) / 2 for w in flow["windows"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    measure = flow.get("measure", "prob")
    scale = 1 if measure == "logit_diff" else 100  # logits as they are; shares in percent
    for e, vals in flow["edges"].items():
        ax.plot(x, [scale * v for v in vals], marker="o", ms=3, label=e)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("layer (window centre)")
    ax.set_ylabel(MEASURES[measure][1])
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out / "flow.png.tmp"
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, out / "flow.png")
    plt.close(fig)


@click.command()
@model_opt
@click.option("--data", default="easy-vqa", show_default=True)
@click.option("--qtype", default=None, help="question types (comma-separated; 'all'); default: shape on easy-VQA, all elsewhere")
@click.option("--n-images", default=20, show_default=True)
@click.option("--window", default=1, show_default=True, help="consecutive layers knocked out together")
@click.option("--heads", default=None, help="also knock out only in these heads, vs random heads of the same count")
@click.option("--from-attribution", default=None, help="an attribution run directory: use its top --top-k heads")
@click.option("--top-k", default=4, show_default=True)
@click.option("--measure", type=click.Choice(["image_frac", "logit_diff", "prob"]), default="image_frac", show_default=True,
              help="image_frac: change of the answer logit as a share of the full image knockout's; logit_diff: the "
                   "change in logits; prob: relative change of the answer probability (Geva et al.; flat when p ~ 1)")
@click.option("--out", default="runs/flow", show_default=True, help="output directory (rewritten by a rerun of the same settings)")
@force_opt
@device_opt
@friendly
def flow(model, data, qtype, n_images, window, heads, from_attribution, top_k, measure, out, force, device):
    """Attention knockout between token groups, layer window by layer window."""
    from tqdm import tqdm

    from headsteer import get_adapter, load
    from headsteer.data import load_data

    from .flow import MEASURE_WORDS, describe, flow_dataset

    m, proc = load(model, device=device)
    ad = get_adapter(m, proc)
    ds = load_data(data, limit=n_images, qtypes=qtype_filter(qtype, data))
    hs = heads_option_value(heads, from_attribution, top_k, ad)
    # flow does not resume, but refuses (before the work) a folder that holds another run
    ident, info = run_identity("flow", m, proc, ds, n_images, {"spec": data},
                               {"window": window, "heads": str(hs) if hs is not None else None, "measure": measure})
    outp = open_run(out, ident, force=force, outputs=FLOW_OUTPUTS, info=info).path
    with tqdm(total=min(n_images, len(ds)), desc="flow", unit="img") as bar:
        result = flow_dataset(m, proc, ds, n_images=n_images, window=window, heads=hs, progress=bar.update, measure=measure)
    write_json(outp / "flow.json", result)
    plot_flow(outp, result)
    text = "\n".join([f"# Token-level flow ({result['n_images']} images, window {window})", "",
                      f"Effect of knocking out each edge: {MEASURE_WORDS[measure]} (measure {measure}).", ""] + describe(result)) + "\n"
    write_text(outp / "summary.md", text)
    click.echo(text)
    click.echo(f"wrote {out}/: flow.json flow.png summary.md")


commands = [flow]
