"""``headsteer attribute``."""
from __future__ import annotations

from pathlib import Path

import click

from headsteer.cli import device_opt, dtype_opt, force_opt, friendly, model_opt, qtype_filter
from headsteer.parallel import process_shard


@click.command()
@model_opt
@click.option("--data", default="easy-vqa", show_default=True, help="easy-vqa[:split] or a local VQA file/folder")
@click.option("--qtype", default=None, help="question types (comma-separated; 'all'); default: shape on easy-VQA, all elsewhere")
@click.option("--n-images", default=40, show_default=True, help="examples to attribute")
@click.option("--masks", default=256, show_default=True, help="random ablation masks per example")
@click.option("--alpha", default=0.1, show_default=True, help="probability that a head is ablated in a mask")
@click.option("--baseline", default="mean", show_default=True, type=click.Choice(["mean", "blank", "zero"]))
@click.option("--statistic", default="logit", show_default=True, type=click.Choice(["logit", "margin"]))
@click.option("--method", default="ridge", show_default=True, type=click.Choice(["ridge", "lasso"]))
@click.option("--n-eval", default=40, show_default=True, help="held-out examples for the top-k ablation curves")
@click.option("--k-max", default=None, type=int, help="largest k of the top-k curves (default: a quarter of the heads, at most 16)")
@click.option("--no-compare", is_flag=True, help="skip single-head / attention baselines and the top-k curves")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default="runs/attribute", show_default=True,
              help="output directory (a rerun of the same model, data and settings resumes)")
@force_opt
@device_opt
@dtype_opt
@friendly
def attribute(model, data, qtype, n_images, masks, alpha, baseline, statistic, method, n_eval, k_max, no_compare, seed, out, force,
              device, dtype):
    """Rank heads by how much the answer depends on the image flowing through them (COAR)."""
    from tqdm import tqdm

    from headsteer import load
    from headsteer.data import load_data

    from .pipeline import attribute_dataset
    from .run import Settings

    m, proc = load(model, device=device, dtype=dtype)
    qtypes = qtype_filter(qtype, data)
    ds = load_data(data, limit=n_images + n_eval, qtypes=qtypes)
    s = Settings(n_images=n_images, masks=masks, alpha=alpha, baseline=baseline, statistic=statistic, method=method,
                 seed=seed, compare=not no_compare)
    total = min(n_images, len(ds)) + (0 if no_compare else max(0, min(len(ds), n_images + n_eval) - n_images))
    rank, _ = process_shard()
    with tqdm(total=total, desc="attribute", unit="img", disable=rank > 0) as bar:
        result = attribute_dataset(m, proc, ds, s, out, k_max=k_max, n_eval=n_eval, progress=bar.update, force=force)
    if result is None:
        return
    click.echo((Path(out) / "summary.md").read_text())
    click.echo(f"wrote {out}/: run.json per_image.jsonl scores.safetensors heads.json heatmap.png"
               + (" topk_curve.png" if "topk_curves" in result else "") + " summary.md")


from .flow_cli import flow  # noqa: E402

commands = [attribute, flow]
