"""``headsteer flow``.

Library imports (torch, transformers, datasets) are inside the functions: `headsteer flow --help`
must not pay for them (start-up time)."""
from __future__ import annotations

from pathlib import Path

import click

from headsteer.cli_options import force_opt, friendly, load_options, progress_bar, qtype_filter, self_check_opt
from headsteer.errors import HeadsteerError
from headsteer.files import save_figure, write_json, write_text

FLOW_OUTPUTS = ("flow.json", "flow.png", "summary.md", "report.html")


def heads_option_value(heads, from_attribution, top_k, ad):
    from headsteer.heads import select_heads

    if not heads and not from_attribution:
        return None
    return select_heads(heads, from_attribution, top_k, num_layers=ad.num_layers, num_heads=ad.num_heads,
                        model=ad.model)[0]


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
    save_figure(fig, out / "flow.png")
    plt.close(fig)


@click.command()
@load_options
@click.option("--data", default="easy-vqa", show_default=True, help="easy-vqa[:split] or a local VQA file/folder (box column for "
              "object/background patches)")
@click.option("--qtype", default=None, help="question types (comma-separated; 'all')  [default: shape on easy-VQA, all elsewhere]")
@click.option("--n-images", default=20, show_default=True, type=click.IntRange(min=1), help="examples to knock out on")
@click.option("--window", default=1, show_default=True, type=click.IntRange(min=1),
              help="consecutive layers knocked out together (1 to the model's layers)")
@click.option("--heads", default=None, help="also knock out only in these heads (e.g. L3H4,L3H7), vs random heads of the same count")
@click.option("--from-attribution", default=None, help="an attribution run directory: use its top --top-k heads")
@click.option("--top-k", default=4, show_default=True, type=click.IntRange(min=1), help="with --from-attribution: how many heads")
@click.option("--measure", type=click.Choice(["image_frac", "logit_diff", "prob"]), default="image_frac", show_default=True,
              help="image_frac: change of the answer logit as a share of the full image knockout's; logit_diff: the "
                   "change in logits; prob: relative change of the answer probability (Geva et al.; flat when p ~ 1)")
@click.option("--out", default="runs/flow", show_default=True,
              help="output directory (a rerun of the same settings shows its results; --force recomputes)")
@force_opt
@self_check_opt
@friendly
def flow(model, device, dtype, device_map, data, qtype, n_images, window, heads, from_attribution, top_k, measure, out, force,
         no_self_check):
    """Attention knockout between token groups, layer window by layer window."""
    from headsteer import get_adapter, load
    from headsteer.data import load_data
    from headsteer.rundir import check_out, open_run, record, run_identity
    from headsteer.selfcheck import SKIPPED, check_example

    from .flow import MEASURE_WORDS, MEASURES, describe, flow_dataset
    from .html_report import write_flow_report

    check_out(out)
    m, proc = load(model, device=device, dtype=dtype, device_map=device_map)
    ad = get_adapter(m, proc)
    if window > ad.num_layers:
        raise HeadsteerError(f"--window must be between 1 and {ad.num_layers} (the model's layers); got {window}")
    ds = load_data(data, limit=n_images, qtypes=qtype_filter(qtype, data))
    if len(ds) == 0:
        raise HeadsteerError(f"no questions in {data} with --qtype {qtype}: choose question types the data has (or all)")
    hs = heads_option_value(heads, from_attribution, top_k, ad)
    # refuses (before the work) a folder that holds another run; the same run is not redone
    ident, info = run_identity("flow", m, proc, ds, n_images, {"spec": data},
                               {"window": window, "heads": str(hs) if hs is not None else None, "measure": measure})
    run = open_run(out, ident, force=force, outputs=FLOW_OUTPUTS, info=info)
    outp = run.path
    if run.resumed and all((outp / n).exists() for n in FLOW_OUTPUTS):
        click.echo((outp / "summary.md").read_text())
        click.echo(f"{out}/ already holds this run (same model, data and settings): shown above, nothing rewritten; "
                   "--force recomputes it")
        return
    record(run, "self_check", dict(SKIPPED) if no_self_check else check_example(m, proc, ds[0]))
    with progress_bar(min(n_images, len(ds)), "flow", "img") as bar:
        result = flow_dataset(m, proc, ds, n_images=n_images, window=window, heads=hs, progress=bar.update, measure=measure)
    write_json(outp / "flow.json", result)
    plot_flow(outp, result)
    lines = describe(result)
    text = "\n".join([f"# Token-level flow ({result['n_images']} images, window {window})", "",
                      f"Effect of knocking out each edge: {MEASURE_WORDS[measure]} (measure {measure}).", ""] + lines) + "\n"
    write_text(outp / "summary.md", text)
    write_flow_report(outp, result, MEASURES[measure][1], MEASURE_WORDS[measure], lines, {"window": window})
    click.echo(text)
    click.echo(f"wrote {out}/: run.json headsteer.log {' '.join(FLOW_OUTPUTS)}")

