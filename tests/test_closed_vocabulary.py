"""Closed-vocabulary accuracy scores against the data set's whole answer vocabulary (or --answers), so a
question's prediction does not depend on which other questions are in the run (--limit, --qtype)."""
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import headsteer
from headsteer.cli import main
from headsteer.data import answer_vocabulary, load_data, load_easy_vqa
from headsteer.edit.tasks import shifted
from headsteer.eval import evaluate, load_pope

EASY = ["black", "blue", "brown", "circle", "gray", "green", "no", "rectangle", "red", "teal", "triangle", "yellow", "yes"]
NOISY = "noise:1.0"  # images the model cannot read well: it gets some questions wrong


def test_easy_vqa_vocabulary_survives_limit_qtype_and_select():
    ds = load_easy_vqa("test", limit=3, qtypes=("shape",), with_images=False)
    assert set(ds["answer"]) < set(EASY)
    assert answer_vocabulary(ds) == EASY == answer_vocabulary(ds.select([0]))
    renamed = shifted(ds, "rename:circle=ball")
    assert answer_vocabulary(renamed) == sorted(set(EASY) - {"circle"} | {"ball"})


def test_prediction_alone_equals_prediction_in_a_run(default_model):
    model, proc = default_model
    run = shifted(load_easy_vqa("test", limit=300), NOISY)
    rows = evaluate(model, proc, run, ("accuracy",), batch_size=64, check=False)
    wrong = [r["index"] for r in rows if not r["correct"]]
    assert wrong, "the noisy images should make the model miss some questions (else this test shows nothing)"
    for i in wrong[:4] + [r["index"] for r in rows if r["correct"]][:2]:
        alone = evaluate(model, proc, run.select([i]), ("accuracy",), check=False)  # a run of one question
        assert alone[0]["prediction"] == rows[i]["prediction"] and alone[0]["correct"] == rows[i]["correct"]


def test_best_answer_outside_the_gold_answers_is_wrong(default_model):
    model, proc = default_model
    ad = headsteer.get_adapter(model, proc)
    yes = load_easy_vqa("test", limit=300).filter(lambda r: r["answer"] == "yes").select(range(24))
    ds = shifted(yes, NOISY)  # every gold answer is "yes"
    rows = evaluate(model, proc, ds, ("accuracy",), batch_size=24, check=False)
    with torch.no_grad():
        logits = model(**ad.encode(ds["image"], ds["question"])).logits[:, -1]
    best = [EASY[j] for j in logits[:, [ad.answer_token_id(a) for a in EASY]].argmax(-1).tolist()]
    assert any(b != "yes" for b in best), "the model should answer something else to some (else this test shows nothing)"
    assert [r["prediction"] for r in rows] == best
    assert [r["correct"] for r in rows] == [float(b == "yes") for b in best]


def _vqa_file(tmp_path):
    for i, c in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (64, 64), c).save(tmp_path / f"{i}.png")
    rows = [{"image": "0.png", "question": "what color?", "answer": "red", "qtype": "color"},
            {"image": "1.png", "question": "what color?", "answers": None, "answer": "green", "qtype": "color"},
            {"image": "2.png", "question": "is it blue?", "answer": "yes", "qtype": "yes/no"}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    return path


def test_local_file_vocabulary_is_the_whole_file(tmp_path):
    path = _vqa_file(tmp_path)
    assert answer_vocabulary(load_data(str(path), limit=1)) == ["green", "red", "yes"]
    assert answer_vocabulary(load_data(str(path), qtypes=("yes/no",))) == ["green", "red", "yes"]
    pope = tmp_path / "pope.jsonl"
    pope.write_text(json.dumps({"image": "0.png", "question": "is there a dog?", "label": "no"}) + "\n")
    assert answer_vocabulary(load_pope(pope)) == ["no", "yes"]


def _run_json(out):
    return json.loads((out / "run.json").read_text())


def test_cli_answers_file(tmp_path):
    shapes = tmp_path / "shapes.txt"
    shapes.write_text("triangle\ncircle\n\nrectangle\n")
    out = tmp_path / "ev"
    args = ["-q", "eval", "--limit", "6", "--qtype", "shape", "--metrics", "accuracy", "--out", str(out)]
    r = CliRunner().invoke(main, [*args, "--answers", str(shapes)])
    assert r.exit_code == 0, r.output
    text = json.dumps(_run_json(out))
    assert '"circle", "rectangle", "triangle"' in text and '"n": 3' in text
    preds = [json.loads(line)["prediction"] for line in (out / "per_example.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and set(preds) <= {"circle", "rectangle", "triangle"}
    # other candidates are another run: refused, not resumed
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "settings" in r.output, r.output
    r = CliRunner().invoke(main, [*args[:-2], "--mode", "open", "--answers", str(shapes), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "--answers" in r.output and "closed" in r.output, r.output
    r = CliRunner().invoke(main, [*args[:-2], "--answers", str(tmp_path / "none.txt"), "--out", str(tmp_path / "n")])
    assert r.exit_code == 1 and "none.txt" in r.output and "Traceback" not in r.output, r.output


def test_run_json_records_the_vocabulary_not_the_subset(default_model, tmp_path):
    model, proc = default_model
    ds = load_easy_vqa("test", limit=2)
    evaluate(model, proc, ds, ("accuracy",), out_dir=tmp_path, check=False)
    rec = json.dumps(_run_json(tmp_path))
    assert json.dumps(EASY) in rec and '"n": 13' in rec
    with pytest.raises(headsteer.HeadsteerError, match="closed"):
        evaluate(model, proc, ds, ("accuracy",), mode="open", answers=["red"], check=False)


def test_compare_scores_every_edit_against_the_same_candidates(default_model, tmp_path):
    from headsteer.edit import EditManifest
    from headsteer.eval.comparison import compare

    model, proc = default_model
    ds = load_easy_vqa("test", limit=3, qtypes=("shape",))
    shapes = ["triangle", "circle", "rectangle"]
    compare(model, proc, ds, {"zero": EditManifest("scale", "L3H0-7", {"factor": 0.0})}, tmp_path, ("accuracy",),
            check=False, answers=shapes)
    runs = [tmp_path, *(p.parent for p in (tmp_path / "runs").glob("*/run.json"))]
    assert len(runs) == 3
    for run in runs:
        assert _run_json(run)["candidates"] == sorted(shapes)
