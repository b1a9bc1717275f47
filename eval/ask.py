"""``headsteer ask``: one question about one image, side by side with an edit's answer.

torch and transformers are imported inside ``ask``: `headsteer ask --help` must not pay for them
(start-up time)."""
from __future__ import annotations

import click

from headsteer.cli_options import friendly, load_options, self_check_opt


def ask(model, image, question, edit_path=None, top=3, device=None, dtype=None, device_map=None,
        allow_other_model: bool = False, check: bool = True) -> list[str]:
    """Lines of the answer (and the edited answer) to ``question`` about ``image``. ``check``: the
    engine's self-check on this example first (identity; stops with one line if it fails)."""
    from headsteer.ask import default_image, top_answers
    from headsteer.data import check_question
    from headsteer.edit import apply_edit, load_edited, load_manifest
    from headsteer.edit.apply import refuse_baked
    from headsteer.selfcheck import check_example

    check_question(question)
    manifest = load_manifest(edit_path) if edit_path else None  # a bad manifest fails before the model loads
    if manifest is not None:
        refuse_baked(manifest)  # an exported checkpoint's manifest: its edit is in those weights, not in --model's
    # an exported checkpoint's edit that is not in its weights is applied, never dropped
    m, proc = load_edited(model, device=device, dtype=dtype, device_map=device_map)
    image = image or default_image()
    if check:
        check_example(m, proc, {"image": image, "question": question})
    lines = [f"image     {image}", f"question  {question}"]
    base = top_answers(m, proc, image, question, top)
    lines.append("answer    " + "  ".join(f"{a} ({p:.2f})" for a, p, _ in base))
    if manifest is not None:
        with apply_edit(m, manifest, processor=proc, allow_other_model=allow_other_model):
            edited = top_answers(m, proc, image, question, top)
        lines.append("edited    " + "  ".join(f"{a} ({p:.2f})" for a, p, _ in edited) + f"   [{manifest.describe()}]")
    return lines


@click.command("ask")
@load_options
@click.option("--image", "image", default=None, help="image path (default: the first easy-VQA test image)")
@click.option("--question", default="what color is the shape?", show_default=True,
              help="the question (the prompt template adds the image)")
@click.option("--edit", "edit_path", default=None, help="edit manifest (JSON) to apply; its answer is shown beside the unedited one")
@click.option("--top", default=3, show_default=True, type=click.IntRange(1, 100), help="how many candidate answers to show")
@click.option("--allow-other-model", is_flag=True, help="apply an edit made on other weights than --model's (base_hash differs)")
@self_check_opt
@friendly
def ask_cmd(model, device, dtype, device_map, image, question, edit_path, top, allow_other_model, no_self_check):
    """Answer one question about one image (and show an edit's effect)."""
    for line in ask(model, image, question, edit_path=edit_path, top=top, device=device, dtype=dtype, device_map=device_map,
                    allow_other_model=allow_other_model, check=not no_self_check):
        click.echo(line)
