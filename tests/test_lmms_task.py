"""`headsteer export-task`: the exported files round-trip to the rows eval reads, the task YAML
points at local files only, and the standalone utils.py scores as `headsteer eval` does (no
lmms-eval needed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from headsteer.cli import main
from headsteer.eval import soft_accuracy
from headsteer.eval.cli import eval_data


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: ("!function", loader.construct_scalar(node)))


def _export(tmp_path, *args, name="task"):
    out = tmp_path / name
    r = CliRunner().invoke(main, ["export-task", *args, "--out", str(out)])
    return r, out


def _rows(out):
    return [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]


def _task(out):
    [path] = (out / "tasks").glob("*.yaml")
    return yaml.load(path.read_text(), Loader=_Loader)


def _vqa_fixture(tmp_path) -> Path:
    """Three VQAv2-style questions with ten reference answers each, JPEG and PNG images."""
    folder = tmp_path / "vqa"
    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, ext in enumerate(("jpg", "png")):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / "img" / f"{k}.{ext}")
    rows = [{"image": "img/0.jpg", "question": "how many dogs?", "answers": ["2"] * 3 + ["two"] + ["3"] * 6, "qtype": "number"},
            {"image": "img/1.png", "question": "what colour is it?", "answers": ["red"] * 10, "qtype": "other"},
            {"image": "img/0.jpg", "question": "is it a dog?", "answers": ["yes"] * 9 + ["no"], "qtype": "yes/no"}]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "data.jsonl"


@pytest.mark.parametrize("spec", ["easy-vqa", "vqa"])
def test_export_round_trips_to_the_rows_eval_reads(tmp_path, spec):
    data = "easy-vqa:test" if spec == "easy-vqa" else f"vqa:{_vqa_fixture(tmp_path)}"
    r, out = _export(tmp_path, "--data", data, "--limit", "9")
    assert r.exit_code == 0, r.output
    ds = eval_data(data, "all", 9, None)
    rows = _rows(out)
    assert len(rows) == len(ds) == (9 if spec == "easy-vqa" else 3)
    for i, (row, ex) in enumerate(zip(rows, ds)):
        assert row["index"] == i
        assert (row["question"], row["answer"], row["answers"], row["qtype"]) == (
            ex["question"], ex["answer"], ex["answers"], ex["qtype"])
        img = Image.open(out / row["image"])
        assert img.format == "PNG" and np.array_equal(np.asarray(img.convert("RGB")), np.asarray(ex["image"]))
    # each distinct image once
    assert len(list((out / "images").iterdir())) == len({row["image"] for row in rows}) < len(rows)
    if spec == "vqa":
        assert rows[0]["answers"] == ["2"] * 3 + ["two"] + ["3"] * 6


def test_task_yaml_points_at_local_files_only(tmp_path):
    r, out = _export(tmp_path, "--limit", "20", "--qtype", "shape,yes/no", "--name", "hs_easy", "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    task = _task(out)
    assert task["task"] == "hs_easy" and (out / "tasks" / "hs_easy.yaml").exists()
    assert task["dataset_path"] == "json" and task["test_split"] == "test"
    [data_file] = task["dataset_kwargs"]["data_files"].values()
    assert Path(data_file).is_absolute() and Path(data_file) == (out / "data.jsonl").resolve()
    text = (out / "tasks" / "hs_easy.yaml").read_text()
    assert "hf://" not in text and "http" not in text
    utils = (out / "tasks" / "utils.py").read_text()
    for key in ("doc_to_visual", "doc_to_text", "doc_to_target", "process_results"):
        tag, ref = task[key]
        assert tag == "!function" and ref == f"utils.{key}" and f"def {key}(" in utils
    assert task["generation_kwargs"]["max_new_tokens"] == 4
    assert [m["metric"] for m in task["metric_list"]] == ["accuracy", "accuracy_shape", "accuracy_yes_no"]
    assert {row["qtype"] for row in _rows(out)} == {"shape", "yes/no"}


# (prediction, reference answers): exact match after normalisation, soft accuracy with several
CASES = [("Two", ["2"]), ("2", ["two"]), ("The red.", ["red"]), ("red", ["blue"]), ("circle circle", ["circle"]),
         ("  triangle\n", ["triangle"]), ("two", ["2", "2", "2", "3"]), ("3", ["2"] * 3 + ["two"] + ["3"] * 6),
         ("2", ["2"] * 3 + ["two"] + ["3"] * 6), ("yes", ["yes"] * 9 + ["no"]), ("no", ["yes"] * 9 + ["no"]),
         ("dont", ["don't"]), ("", ["red"])]


def test_utils_imports_standalone_and_scores_as_eval(tmp_path):
    r, out = _export(tmp_path, "--data", f"vqa:{_vqa_fixture(tmp_path)}")
    assert r.exit_code == 0, r.output
    docs = [{"answer": a[0], "answers": a, "qtype": "yes/no", "question": "q?", "image": "x"} for _, a in CASES]
    code = ("import json, sys\nsys.path.insert(0, sys.argv[1])\nimport utils\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'headsteer')\nassert not bad, bad\n"
            "docs, preds = json.loads(sys.argv[2]), json.loads(sys.argv[3])\n"
            "class Result:\n    def __init__(self, text): self.text = text\n"
            "out = [utils.process_results(d, [p]) for d, p in zip(docs, preds)]\n"
            "out.append(utils.process_results(docs[0], [Result(preds[0])]))\n"
            "row = json.loads(open(sys.argv[4]).readline())\n"
            "img = utils.doc_to_visual(row)[0]\n"
            "print(json.dumps({'scores': out, 'text': utils.doc_to_text(row), 'target': utils.doc_to_target(row), "
            "'size': list(img.size)}))\n")
    p = subprocess.run([sys.executable, "-I", "-c", code, str(out / "tasks"), json.dumps(docs),
                        json.dumps([c[0] for c in CASES]), str(out / "data.jsonl")],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    for (pred, answers), s in zip(CASES, got["scores"]):
        assert s == {"accuracy": pytest.approx(soft_accuracy(pred, answers)), "accuracy_yes_no": s["accuracy"]}, (pred, answers)
    assert got["scores"][-1] == got["scores"][0]
    assert [s["accuracy"] for s in got["scores"][:4]] == [1.0, 1.0, 1.0, 0.0]  # "Two" vs "2", "2" vs "two"
    assert got["scores"][7]["accuracy"] == pytest.approx(1.0) and got["scores"][8]["accuracy"] == pytest.approx(0.9)
    assert got["text"] == "how many dogs?" and got["target"] == "3" and got["size"] == [48, 40]


def test_out_is_guarded(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    r, _ = _export(tmp_path, "--limit", "3", name="foreign")
    assert r.exit_code == 1 and "not written by headsteer" in r.output and len(r.output.strip().splitlines()) == 1
    assert (foreign / "notes.txt").read_text() == "mine"

    r, out = _export(tmp_path, "--limit", "3")
    assert r.exit_code == 0, r.output
    r, _ = _export(tmp_path, "--limit", "3")  # the same export again: rewritten
    assert r.exit_code == 0, r.output
    r, _ = _export(tmp_path, "--limit", "4")
    assert r.exit_code == 1 and "differs in: data" in r.output
    (out / "mine.txt").write_text("keep")
    r, _ = _export(tmp_path, "--limit", "4", "--force")
    assert r.exit_code == 0, r.output
    assert len(_rows(out)) == 4 and (out / "mine.txt").read_text() == "keep"
    referenced = {row["image"] for row in _rows(out)}
    assert {f"images/{p.name}" for p in (out / "images").iterdir()} == referenced

    r, _ = _export(tmp_path, "--limit", "3", "--name", "9bad-name", name="other")
    assert r.exit_code == 1 and "--name" in r.output
    r, _ = _export(tmp_path, "--qtype", "nonesuch", name="other2")
    assert r.exit_code == 1 and "no questions" in r.output


def test_agreement_reads_lmms_samples_and_compares_per_question(tmp_path):
    from headsteer.eval.lmms_task import agreement, read_lmms_samples

    rows = [{"index": i, "question": f"q{i}?", "answer": a, "answers": [a], "qtype": t}
            for i, (a, t) in enumerate([("red", "color"), ("circle", "shape"), ("yes", "yes/no"), ("2", "count")])]
    # lmms-eval's --log_samples lines: a string, a one-element list, a result object as a dict
    samples = [{"doc_id": 0, "filtered_resps": "red", "accuracy": 1.0, "input": "q0?"},
               {"doc_id": 1, "filtered_resps": ["circle yes no"], "accuracy": 0.0, "input": "q1?"},
               {"doc_id": 2, "filtered_resps": [{"text": " no"}], "accuracy": 0.0, "input": "q2?"},
               {"doc_id": 3, "filtered_resps": "Two", "accuracy": 1.0, "input": "q3?"}]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    lmms = read_lmms_samples(path)
    assert [lmms[i]["prediction"] for i in range(4)] == ["red", "circle yes no", " no", "Two"]
    eval_rows = [{"index": 0, "prediction": "red", "correct": 1.0}, {"index": 1, "prediction": "circle", "correct": 1.0},
                 {"index": 2, "prediction": "no", "correct": 0.0}]  # index 3 missing on headsteer's side
    r = agreement(rows, lmms, eval_rows)
    assert (r["compared"], r["n_missing"], r["same_answer"], r["same_score"]) == (3, 1, 2, 2)
    assert r["headsteer_answer_is_prefix"] == 3 and r["lmms_score_rechecked"] == 3 and not r["question_mismatch"]
    assert r["accuracy"]["lmms-eval"]["all"] == pytest.approx(1 / 3) and r["accuracy"]["headsteer"]["all"] == pytest.approx(2 / 3)
    assert r["accuracy"]["headsteer"]["shape"] == 1.0 and r["accuracy"]["lmms-eval"]["shape"] == 0.0
    assert [d["index"] for d in r["differ"]] == [1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"doc_id": 0, "exact_match": 1.0}) + "\n")
    with pytest.raises(ValueError, match="not a sample of a headsteer export-task"):
        read_lmms_samples(bad)


def _doc_command_lines():
    import re

    doc = (Path(__file__).parent.parent / "docs" / "lmms_eval.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", doc, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("headsteer "):
                yield line[len("headsteer "):]


@pytest.mark.parametrize("line", list(_doc_command_lines()))
def test_doc_command_lines_parse(line):
    import shlex

    import click

    words = shlex.split(line)
    ctx = click.Context(main)
    cmd = main.get_command(ctx, words[0])
    rest = words[1:]
    if isinstance(cmd, click.Group):
        cmd, rest = cmd.get_command(ctx, rest[0]), rest[1:]
    assert cmd is not None, line
    cmd.make_context(cmd.name, list(rest), resilient_parsing=False)


def test_a_checkpoints_baked_manifest_is_refused_on_the_base_model(tmp_path):
    """The recipe compares lmms-eval on an exported checkpoint with `headsteer eval --edit`: the
    checkpoint's own manifest (baked) would change nothing on the base model, so it is refused in one
    line rather than giving the unedited model's numbers — also on the checkpoint itself, where it
    would apply nothing either (`--model CHECKPOINT` alone evaluates the edit)."""
    run = CliRunner().invoke
    e, ck = tmp_path / "e.json", tmp_path / "ck"
    assert run(main, ["edit", "scale", "--heads", "L2H0-7,L3H0-7", "--factor", "0", "--out", str(e)]).exit_code == 0
    assert run(main, ["export", "--edit", str(e), "--out", str(ck)]).exit_code == 0
    args = ["--limit", "2", "--metrics", "accuracy", "--mode", "open", "--no-self-check"]
    r = run(main, ["eval", "--edit", str(ck / "headsteer_edit.json"), *args, "--out", str(tmp_path / "a")])
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1 and "baked" in errors[0] and "Traceback" not in r.output, r.output
    r = run(main, ["eval", "--model", str(ck), "--edit", str(ck / "headsteer_edit.json"), *args, "--out", str(tmp_path / "b")])
    assert r.exit_code == 1 and "baked" in r.output, r.output
    assert not (tmp_path / "b").exists()  # refused before the run folder was written
    r = run(main, ["eval", "--model", str(ck), *args, "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    r = run(main, ["eval", "--edit", str(e), *args, "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
