"""``headsteer attribute``."""
from __future__ import annotations

import time
from pathlib import Path

import click

from headsteer.cli_options import force_opt, friendly, load_options, progress_bar, qtype_filter, self_check_opt
from headsteer.parallel import process_shard


@click.command()
@load_options
@click.option("--data", default="easy-vqa", show_default=True, help="easy-vqa[:split] or a local VQA file/folder")
@click.option("--qtype", default=None, help="question types (comma-separated; 'all'); default: shape on easy-VQA, all elsewhere")
@click.option("--n-images", default=40, show_default=True, type=click.IntRange(min=1), help="examples to attribute")
@click.option("--masks", default=256, show_default=True, help="random ablation masks per example")
@click.option("--alpha", default="0.1", show_default=True,
              help="ablation rate: probability that a head is ablated in a mask; several, comma-separated (0.1,0.5,0.9), "
                   "fit one ranking per rate, the first being the primary one")
@click.option("--baseline", default="mean", show_default=True, type=click.Choice(["mean", "blank", "zero"]),
              help="what an ablated head reads at image positions: mean image K/V over reference images, a blank image's, or zeros")
@click.option("--statistic", default="margin", show_default=True, type=click.Choice(["logit", "margin"]),
              help="margin: answer logit minus the best other answer of the data set; logit: the answer logit")
@click.option("--method", default="ridge", show_default=True, type=click.Choice(["ridge", "lasso"]),
              help="linear model from masks to the statistic (--scorer coar); its penalty is chosen by cross-validation")
@click.option("--scorer", default="coar", show_default=True, type=click.Choice(["coar", "atp", "atp*", "grad-coar"]),
              help="what ranks the heads: coar (regression over --masks random masks), atp / atp* (gradient estimates of "
                   "single-head ablation, one forward and backward per image), grad-coar (COAR's coefficients from the "
                   "gradients at --grad-masks random masks)")
@click.option("--grad-masks", default=32, show_default=True, type=int,
              help="random masks per image and rate whose gradients grad-coar averages")
@click.option("--n-eval", default=40, show_default=True, help="held-out examples for the faithfulness/completeness curves")
@click.option("--k-max", default=None, type=click.IntRange(min=1), help="largest k of the curves (default: every head)")
@click.option("--n-random", default=3, show_default=True, type=click.IntRange(min=0), help="random rankings in the curves (their per-image mean)")
@click.option("--min-gap", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="curves leave out images whose s(clean) - s(all ablated) is below this share of the median")
@click.option("--no-compare", is_flag=True, help="skip single-head / attention baselines and the curves")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1),
              help="seed of the random masks and random rankings")
@click.option("--out", default="runs/attribute", show_default=True,
              help="output directory (a rerun of the same model, data and settings resumes)")
@force_opt
@self_check_opt
@friendly
def attribute(model, device, dtype, device_map, data, qtype, n_images, masks, alpha, baseline, statistic, method, scorer, grad_masks,
              n_eval, k_max, n_random, min_gap, no_compare, seed, out, force, no_self_check):
    """Rank heads by how much the answer depends on the image flowing through them (COAR, or gradients)."""
    from headsteer import load
    from headsteer.data import load_data
    from headsteer.errors import HeadsteerError
    from headsteer.rundir import check_out

    from .pipeline import attribute_dataset
    from .run import OUTPUTS, Settings

    s = Settings(n_images=n_images, masks=masks, alpha=alpha, baseline=baseline, statistic=statistic, method=method,
                 seed=seed, compare=not no_compare, n_random=n_random, scorer=scorer,
                 grad_masks=grad_masks)  # checks the settings before loading anything
    check_out(out)
    t0 = time.perf_counter()
    m, proc = load(model, device=device, dtype=dtype, device_map=device_map)
    t_load = time.perf_counter() - t0
    qtypes = qtype_filter(qtype, data)
    ds = load_data(data, limit=n_images + n_eval, qtypes=qtypes)
    if len(ds) == 0:
        raise HeadsteerError(f"{data} has no questions of type {qtype or 'shape'}: choose another --qtype (or --qtype all)")
    total = min(n_images, len(ds)) + (0 if no_compare else max(0, min(len(ds), n_images + n_eval) - n_images))
    rank, _ = process_shard()
    done = [0]

    def progress(k):
        done[0] += k
        bar.update(k)

    with progress_bar(total, "attribute", "img", rank) as bar:
        t0 = time.perf_counter()
        result = attribute_dataset(m, proc, ds, s, out, k_max=k_max, n_eval=n_eval, progress=progress, force=force,
                                   min_gap_frac=min_gap, check=not no_self_check)
        t_run = time.perf_counter() - t0
    if result is None:
        return
    click.echo((Path(out) / "summary.md").read_text())
    written = [n for n in ("run.json", *OUTPUTS) if (Path(out) / n).exists()]
    click.echo(f"wrote {out}/: {' '.join(written)}")
    if done[0]:  # what a paper-scale run will cost, from this one
        click.echo(f"time: model loaded in {t_load:.1f} s; {done[0]} images {'attributed' if no_compare else '(attributed and held out)'} in {t_run:.1f} s "
                   f"({t_run / done[0]:.3f} s per image {_work(scorer, masks, grad_masks)})")


def _work(scorer, masks, grad_masks) -> str:
    return {"coar": f"at {masks} masks", "grad-coar": f"with grad-coar at {grad_masks} masks"}.get(scorer, f"with {scorer}")

