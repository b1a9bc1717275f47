"""``headsteer eval`` and ``headsteer compare``.

Both print markdown (the one output style of the CLI: tables for people) and write the same
figures as files (``summary.json``/``summary.md``, ``compare.csv``/``compare.md``). Library imports are
inside the commands: `--help` must not pay for torch and transformers (start-up time)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from headsteer.cli_options import device_opt, dtype_opt, force_opt, friendly, model_opt, progress_bar, self_check_opt
from headsteer.errors import HeadsteerError
from headsteer.files import write_json, write_text
from headsteer.parallel import process_shard

METRICS = ("accuracy", "transfer")


def data_options(f):
    f = click.option("--data", default="easy-vqa", show_default=True,
                     help="easy-vqa[:split], vqa:PATH, pope:PATH[::split] or a local VQA file/folder")(f)
    f = click.option("--qtype", default="all", show_default=True,
                     help="question types, comma-separated (easy-VQA: shape, color, yes/no), or all")(f)
    f = click.option("--limit", default=500, show_default=True, type=click.IntRange(min=1), help="examples to evaluate (the first N)")(f)
    f = click.option("--task", default=None, help="shift the data: contrast:C, noise:S or rename:old=new,...  [default: none]")(f)
    f = click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="examples per forward pass")(f)
    f = click.option("--baseline", default="mean", show_default=True, type=click.Choice(["mean", "blank", "zero"]),
                     help="what ablated heads read at image positions (transfer metrics): mean image K/V, a blank image's, zeros")(f)
    f = click.option("--top-heads", default=None, help="heads for the top-k recovery metric, e.g. L3H7,L3H4  [default: --attribution's top 4]")(f)
    f = click.option("--attribution", default=None, help="attribution run directory (heatmap in reports, top heads)")(f)
    f = click.option("--device-map", default=None, help="'auto' to spread a large model over GPUs (accelerate)  [default: none]")(f)
    f = click.option("--allow-other-model", is_flag=True, help="apply edits made on other weights than --model's (base_hash differs)")(f)
    f = click.option("--answers", "answers_path", default=None, metavar="FILE",
                     help="closed-vocabulary candidates, one answer per line  [default: every answer of the data set, "
                          "whatever --limit and --qtype keep]")(f)
    return device_opt(dtype_opt(model_opt(f)))


def read_answers(path) -> list[str] | None:
    """The candidate answers of ``--answers FILE`` (one per line; blank lines skipped), or None."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise HeadsteerError(f"--answers {path}: no such file (write one candidate answer per line)")
    try:
        answers = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise HeadsteerError(f"--answers {path} is not UTF-8 text: save it as UTF-8") from None
    if not answers:
        raise HeadsteerError(f"--answers {path} holds no answers: write one candidate answer per line")
    return answers


def check_metrics(metrics: str) -> tuple[str, ...]:
    ms = tuple(m.strip() for m in metrics.split(",") if m.strip())
    bad = [m for m in ms if m not in METRICS]
    if bad or not ms:
        raise HeadsteerError(f"--metrics takes {' and/or '.join(METRICS)}, comma-separated; got {metrics!r}")
    return ms


def eval_data(data, qtype, limit, task):
    """The rows ``eval``, ``compare`` and ``export-task`` read for --data, --qtype, --limit, --task."""
    from headsteer.edit.tasks import shifted

    from .benchmarks import load_benchmark

    ds = shifted(load_benchmark(data, limit=limit, qtypes=None if qtype == "all" else tuple(qtype.split(","))), task)
    if len(ds) == 0:
        raise HeadsteerError(f"no questions in {data} with --qtype {qtype}: choose question types the data has (or all)")
    return ds


def _setup(model, data, qtype, limit, task, top_heads, attribution, device, dtype, device_map):
    from headsteer import HeadSet, get_adapter
    from headsteer.edit.checkpoint import load_edited

    # an exported checkpoint's edit that is not in its weights is applied, never dropped
    m, proc = load_edited(model, device=device, dtype=dtype, device_map=device_map)
    ad = get_adapter(m, proc)
    ds = eval_data(data, qtype, limit, task)
    hs = None
    if top_heads:
        hs = HeadSet.parse(top_heads, ad.num_layers, ad.num_heads)
    elif attribution:
        from headsteer.heads import top_heads as attributed  # the parameter top_heads is the --top-heads text

        hs = attributed(attribution, 4, ad.num_layers, ad.num_heads, model=m)
    return m, proc, ds, hs


def edit_names(paths) -> list[str]:
    """Distinct table names for edit files: the file's stem, or as many of its last path parts as
    tell it apart from the others (two ``a.json`` in different folders: ``d1/a``, ``d2/a``), never
    the reference's name ``unedited``."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    depth = [1] * len(paths)

    def name(i):
        return "/".join(parts[i][-depth[i]:])

    while True:
        names = [name(i) for i in range(len(paths))]
        clash = [i for i, n in enumerate(names) if (names.count(n) > 1 or n == "unedited") and depth[i] < len(parts[i])]
        if not clash:
            break
        for i in clash:
            depth[i] += 1
    names = [Path(p).name if n == "unedited" else n for n, p in zip(names, paths)]  # a bare unedited.json
    seen: dict[str, int] = {}
    out = []
    for n in names:  # the same file given twice
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} #{seen[n]}")
    return out


def _data_spec(data, task) -> dict:
    # kept in run.json for people; the identity compares the rows' content, whatever named them
    return {"spec": data, "task": task}


@click.command("eval")
@data_options
@click.option("--edit", "edit_path", default=None, help="edit manifest to apply  [default: none, the unedited model]")
@click.option("--metrics", default="accuracy,transfer", show_default=True,
              help="accuracy and/or transfer (image reliance, blank-image and no-image-flow accuracy, top-k recovery)")
@click.option("--mode", default="closed", type=click.Choice(["closed", "open"]), show_default=True,
              help="closed: the most likely of the data set's answers (or --answers); open: greedy generation (length "
                   "from the model's generation config)")
@click.option("--out", default="runs/eval", show_default=True,
              help="output directory (a rerun of the same model, data, edit and settings resumes)")
@force_opt
@self_check_opt
@friendly
def eval_cmd(model, data, qtype, limit, task, batch_size, baseline, top_heads, attribution, device_map, allow_other_model,
             answers_path, device, dtype, edit_path, metrics, mode, out, force, no_self_check):
    """VQA accuracy and cross-modal transfer (resumable; data-parallel under accelerate launch)."""
    from headsteer.edit import EditManifest
    from headsteer.edit.tasks import check_task
    from headsteer.rundir import check_out

    from .benchmarks import pope_metrics
    from .run import evaluate, summary

    ms = check_metrics(metrics)
    check_task(task)
    check_out(out)
    if answers_path is not None and mode != "closed":
        raise HeadsteerError("--answers gives the candidates of --mode closed: drop it, or use --mode closed")
    answers = read_answers(answers_path)
    edit = EditManifest.load(edit_path) if edit_path else None  # a bad manifest fails before the model loads
    if edit is not None:
        edit.allow_other_model = allow_other_model
    m, proc, ds, hs = _setup(model, data, qtype, limit, task, top_heads, attribution, device, dtype, device_map)
    rank, world = process_shard()
    with progress_bar(len(range(rank, min(limit, len(ds)), world)), f"eval[{rank}]", "ex", rank) as bar:
        rows = evaluate(m, proc, ds, ms, edit=edit, batch_size=batch_size, mode=mode, baseline=baseline,
                        top_heads=hs, out_dir=out, progress=bar.update, force=force, data_spec=_data_spec(data, task),
                        check=not no_self_check, answers=answers)
    if rank != 0:
        return
    s = summary(rows)
    if data.startswith("pope:") and rows and "prediction" in rows[0]:
        s["pope"] = pope_metrics(rows)
    s["edit"] = edit.describe() if edit else None
    s["data"], s["task"], s["processes"] = data, task, world
    outp = Path(out)
    text = summary_markdown(s)
    write_json(outp / "summary.json", s)
    write_text(outp / "summary.md", text)
    if world > 1:
        write_text(outp / "per_example.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    click.echo(text)
    click.echo(f"wrote {out}/: run.json headsteer.log per_example.jsonl summary.json summary.md")


def summary_markdown(s: dict) -> str:
    """The summary as markdown: accuracy per question type with its CI, then the other figures."""
    lines = [f"# Evaluation ({s.get('n')} examples{'; edit ' + s['edit'] if s.get('edit') else ''})", ""]
    acc = s.get("accuracy")
    if acc:
        lines += ["| question type | accuracy | 95% CI | n |", "|---|---|---|---|"]
        lines += [f"| {t} | {a['accuracy']:.4f} | [{a['ci'][0]:.4f}, {a['ci'][1]:.4f}] | {a['n']} |" for t, a in acc.items()]
        lines.append("")
    other = [(k, v) for k, v in s.items() if k not in ("accuracy", "attn_to_image_per_layer", "n", "edit") and v is not None]
    if other:
        lines += ["| figure | value |", "|---|---|"]
        for k, v in other:
            v = f"{v:.4f}" if isinstance(v, float) else ", ".join(f"{x:.4f}" for x in v) if isinstance(v, list) and all(
                isinstance(x, float) for x in v) else json.dumps(v) if isinstance(v, (dict, list)) else v
            lines.append(f"| {k} | {v} |")
    return "\n".join(lines) + "\n"


@click.command()
@data_options
@click.option("--edits", "edit_paths", multiple=True, help="edit manifests: --edits a.json b.json c.json")
@click.argument("more_edits", nargs=-1)
@click.option("--metrics", default="accuracy,transfer", show_default=True, help="accuracy and/or transfer (see eval)")
@click.option("--out", default="runs/compare", show_default=True,
              help="output directory (each edit's evaluation resumes from its own sub-folder)")
@force_opt
@self_check_opt
@friendly
def compare(model, data, qtype, limit, task, batch_size, baseline, top_heads, attribution, device_map, allow_other_model,
            answers_path, device, dtype, edit_paths, more_edits, metrics, out, force, no_self_check):
    """Evaluate the unedited model and each edit on the same examples; table, plot, HTML report."""
    from headsteer.edit import EditManifest

    from .comparison import compare as run_compare
    from .comparison import markdown

    # click gives an option one value: the manifests after the first arrive as arguments
    paths = [p for e in (*edit_paths, *more_edits) for p in e.split()]
    if not paths:
        raise HeadsteerError("no edits to compare: pass --edits a.json b.json ...")
    from headsteer.edit.tasks import check_task
    from headsteer.rundir import check_out

    ms = check_metrics(metrics)
    check_task(task)
    check_out(out)
    answers = read_answers(answers_path)
    edits = dict(zip(edit_names(paths), (EditManifest.load(p) for p in paths)))  # bad manifests fail before the model loads
    for e in edits.values():
        e.allow_other_model = allow_other_model
    m, proc, ds, hs = _setup(model, data, qtype, limit, task, top_heads, attribution, device, dtype, device_map)
    n = min(limit, len(ds))
    with progress_bar(n * (len(edits) + 1), "compare", "ex") as bar:
        rows = run_compare(m, proc, ds, edits, out, ms, attribution, batch_size, baseline, hs,
                           progress=bar.update, limit=limit, force=force, data_spec=_data_spec(data, task),
                           check=not no_self_check, answers=answers)
    click.echo(markdown(rows))
    click.echo(f"wrote {out}/: run.json headsteer.log compare.md compare.csv compare.png report.html, and runs/ (each "
               "edit's evaluation)")


@click.command("export-task")
@click.option("--data", default="easy-vqa", show_default=True,
              help="easy-vqa[:split], vqa:PATH, pope:PATH[::split] or a local VQA file/folder")
@click.option("--qtype", default="all", show_default=True,
              help="question types, comma-separated (easy-VQA: shape, color, yes/no), or all")
@click.option("--limit", default=500, show_default=True, type=click.IntRange(min=1),
              help="questions to export (the first N: the same as eval's --limit)")
@click.option("--task", default=None, help="shift the data: contrast:C, noise:S or rename:old=new,...  [default: none]")
@click.option("--name", default=None, help="lmms-eval task name  [default: headsteer_ + the --out folder's name]")
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(min=1),
              help="the task's generation length (lmms-eval's --gen_kwargs overrides it)")
@click.option("--out", required=True, help="output folder (data.jsonl, images/, tasks/); a rerun of the same export rewrites it")
@force_opt
@friendly
def export_task_cmd(data, qtype, limit, task, name, max_new_tokens, out, force):
    """Write VQA data as local files plus an lmms-eval task that scores it as eval does."""
    from .lmms_task import export_task

    ds = eval_data(data, qtype, limit, task)
    s = export_task(ds, out, name=name, max_new_tokens=max_new_tokens, description=f"--data {data} --qtype {qtype} "
                    f"--limit {limit}" + (f" --task {task}" if task else ""), force=force,
                    data_spec={**_data_spec(data, task), "qtype": qtype, "limit": limit})
    types = ", ".join(f"{t} {k}" for t, k in s["qtypes"].items())
    click.echo(f"{s['n']} questions ({types}), {s['images']} images; lmms-eval task {s['task']} "
               f"(metrics: {', '.join(s['metrics'])}; max_new_tokens {s['max_new_tokens']})")
    click.echo(f"run: python -m lmms_eval --model llava_hf --model_args pretrained=MODEL_DIR,device_map=cpu --device cpu --include_path "
               f"{s['include_path']} --tasks {s['task']} --log_samples --output_path OUT   (install notes: docs/lmms_eval.md)")
    click.echo(f"wrote {out}/: run.json headsteer.log data.jsonl images/ tasks/{s['task']}.yaml tasks/utils.py")
