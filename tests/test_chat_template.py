"""The embedded model's chat template takes content as parts or as one string (legacy clients, lmms-eval
--force_simple), and a prompt that reaches the processor without its image placeholder is refused."""
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import headsteer
from headsteer import HeadsteerError, toy
from headsteer.ask import default_image
from headsteer.cli import main

Q = "what shape is in the image?"


def render(proc, content):
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


def test_shipped_template_is_the_one_toy_builds():
    # the training script writes toy.CHAT_TEMPLATE; a hand edit of one would leave the other behind
    assert Path(headsteer.default_model_path(), "chat_template.jinja").read_text() == toy.CHAT_TEMPLATE


@pytest.mark.parametrize("text", [f"<image>\n{Q}", f"<image> {Q}", f"{Q}\n<image>"])
def test_string_content_renders_the_prompt_of_content_parts(default_model, text):
    _, proc = default_model
    parts = render(proc, [{"type": "image"}, {"type": "text", "text": Q}])
    assert parts == toy.PROMPT.format(question=Q)  # the prompt the model was trained on
    assert render(proc, text) == parts
    image = default_image()
    a = proc(images=[image], text=[render(proc, text)], return_tensors="pt")
    b = proc(images=[image], text=[parts], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and int((a["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 64


def test_string_content_in_a_conversation(default_model):
    _, proc = default_model
    msgs = [{"role": "user", "content": f"<image>\n{Q}"}, {"role": "assistant", "content": "circle"},
            {"role": "user", "content": "what color is the shape?"}]
    out = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert out == f"USER: <image> {Q} ASSISTANT: circle USER: what color is the shape? ASSISTANT:"
    assert render(proc, Q) == f"USER: {Q} ASSISTANT:"  # no image in the string: none is made up


# a template that knows only OpenAI-style image parts: {"type": "image"} is dropped
DROPS_IMAGE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image_url' %}<image> "
               "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}ASSISTANT:")


def test_prompt_without_image_placeholder_is_refused():
    model, proc = headsteer.load("default")  # its own adapter: the session fixture's keeps its processor
    proc.chat_template = DROPS_IMAGE
    ad = headsteer.get_adapter(model, proc)
    with pytest.raises(HeadsteerError) as e:
        ad.encode([default_image()], [Q])
    msg = str(e.value)
    assert "\n" not in msg and "chat template" in msg and "<image>" in msg


def test_cli_names_the_chat_template(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(headsteer.default_model_path(), ckpt)
    (ckpt / "chat_template.jinja").write_text(DROPS_IMAGE)
    r = CliRunner().invoke(main, ["ask", "--model", str(ckpt), "--question", Q])
    assert r.exit_code == 1, r.output
    assert "chat template" in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
