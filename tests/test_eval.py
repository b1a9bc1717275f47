import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import headsteer
from headsteer.attribution import ablated_logits
from headsteer.cli import main
from headsteer.data import load_easy_vqa
from headsteer.edit import EditManifest
from headsteer.eval import bootstrap_ci, evaluate, load_pope, normalize_answer, pope_metrics, soft_accuracy, summary
from headsteer.eval.comparison import compare


def test_answer_normalisation_and_soft_accuracy():
    assert normalize_answer("The Two dogs!") == "2 dogs"
    # official VQA accuracy: min(1, matches / 3) averaged over the leave-one-out subsets
    assert soft_accuracy("two", ["2", "2", "2", "3"]) == pytest.approx(0.75)
    assert soft_accuracy("3", ["2", "2", "2", "3"]) == pytest.approx(0.25)
    assert soft_accuracy("red", ["red"]) == 1.0 and soft_accuracy("blue", ["red"]) == 0.0
    lo, hi = bootstrap_ci([0, 1] * 50)
    assert lo < 0.5 < hi


def test_closed_accuracy_and_resume(default_model, tmp_path):
    model, proc = default_model
    ds = load_easy_vqa("test", limit=12)
    rows = evaluate(model, proc, ds, ("accuracy",), batch_size=5, out_dir=tmp_path)
    assert len(rows) == 12 and all(r["prediction"] in set(ds["answer"]) for r in rows)
    lines = (tmp_path / "per_example.jsonl").read_text().splitlines()
    (tmp_path / "per_example.jsonl").write_text("\n".join(lines[:7]) + "\n" + lines[7][:5])
    seen = []
    again = evaluate(model, proc, ds, ("accuracy",), batch_size=5, out_dir=tmp_path, progress=seen.append)
    assert sum(seen) == 5 and [r["prediction"] for r in again] == [r["prediction"] for r in rows]
    s = summary(rows)
    assert s["accuracy"]["all"]["n"] == 12 and set(s["accuracy"]) >= {"all"}


def test_image_reliance_matches_ablation(default_model):
    model, proc = default_model
    ds = load_easy_vqa("test", limit=3, qtypes=("shape",))
    rows = evaluate(model, proc, ds, ("transfer",), baseline="zero", batch_size=3)
    ad = headsteer.get_adapter(model, proc)
    for r, ex in zip(rows, ds):
        masks = torch.zeros(2, ad.num_layers, ad.num_heads, dtype=torch.bool)
        masks[1] = True
        lg = ablated_logits(model, proc, ex["image"], ex["question"], masks, baseline="zero")
        aid = ad.answer_token_id(ex["answer"])
        assert r["image_reliance"] == pytest.approx(float(lg[0, aid] - lg[1, aid]), abs=1e-4)
        assert len(r["attn_to_image"]) == ad.num_layers and all(0 <= a <= 1 for a in r["attn_to_image"])


def _run_one_and_two_processes(args, tmp_path):
    """Run a CLI command in one process and under a 2-process accelerate launch (gloo on CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HEADSTEER_CACHE": str(tmp_path / "cache")}
    one = subprocess.run([sys.executable, "-m", "headsteer", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "headsteer", *args, "--out", str(tmp_path / "two")],
                         env={**env, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]


def _pope_fixture(tmp_path):
    rows = []
    for i, (cat, lab) in enumerate([("random", "yes"), ("random", "no"), ("popular", "yes"), ("adversarial", "no")]):
        Image.new("RGB", (64, 64), (200, 30 * i, 30)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": "is there a circle in the image?", "label": lab, "category": cat})
    (tmp_path / "pope.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path / "pope.jsonl"


def test_pope_loader_and_metrics(tmp_path):
    ds = load_pope(_pope_fixture(tmp_path))
    assert len(ds) == 4 and set(ds["qtype"]) == {"random", "popular", "adversarial"}
    assert len(load_pope(tmp_path / "pope.jsonl", split="random")) == 2
    rows = [{"prediction": p, "answer": a, "qtype": q} for p, a, q in zip(["yes", "yes", "no", "no"], ds["answer"], ds["qtype"])]
    m = pope_metrics(rows)
    assert m["all"]["accuracy"] == 0.5 and m["all"]["precision"] == 0.5 and m["all"]["recall"] == 0.5
    assert m["all"]["yes_ratio"] == 0.5 and m["random"]["accuracy"] == 0.5


def test_compare_agrees_with_eval_of_each_edit(default_model, tmp_path):
    model, proc = default_model
    ds = load_easy_vqa("test", limit=10)
    edits = {"s0": EditManifest("scale", "L2H0-7", {"factor": 0.0}), "amp": EditManifest("attn", "L3H*", {"alpha": 1.0})}
    rows = compare(model, proc, ds, edits, tmp_path, metrics=("accuracy", "transfer"), baseline="zero", batch_size=4)
    for name in ("s0", "amp"):
        alone = summary(evaluate(model, proc, ds, ("accuracy", "transfer"), edit=edits[name], baseline="zero", batch_size=7))
        row = next(r for r in rows if r["edit"] == name)
        assert row["accuracy"] == pytest.approx(alone["accuracy"]["all"]["accuracy"])
        assert row["image_reliance"] == pytest.approx(alone["image_reliance"], abs=1e-5)
    for f in ("compare.md", "compare.csv", "compare.png", "report.html"):
        assert (tmp_path / f).exists()
    assert "data:image/png;base64" in (tmp_path / "report.html").read_text()


def test_cli_compare_takes_several_edits_after_one_flag(tmp_path):
    for name, e in {"a": EditManifest("scale", "L0H0", {"factor": 0.0}), "b": EditManifest("attn", "L1H1", {"alpha": 1.0}),
                    "c": EditManifest("scale", "L2H2", {"factor": 2.0})}.items():
        e.save(tmp_path / f"{name}.json")
    r = CliRunner().invoke(main, ["compare", "--edits", *(str(tmp_path / f"{n}.json") for n in "abc"), "--limit", "3",
                                  "--metrics", "accuracy", "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    rows = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and [row.split(",")[0] for row in rows[1:]] == ["unedited", "a", "b", "c"]
    r = CliRunner().invoke(main, ["compare", "--limit", "3", "--out", str(tmp_path / "none")])
    assert r.exit_code != 0 and "no edits to compare" in r.output


def test_cli_eval_pope(tmp_path):
    path = _pope_fixture(tmp_path)
    r = CliRunner().invoke(main, ["eval", "--data", f"pope:{path}", "--metrics", "accuracy", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["pope"]["all"]["n"] == 4


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate not installed")
def test_two_process_accelerate_gives_the_same_numbers(tmp_path):
    args = ["eval", "--limit", "10", "--batch-size", "3", "--metrics", "accuracy,transfer", "--baseline", "zero"]
    _run_one_and_two_processes(args, tmp_path)
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["processes"] == 2 and s1["n"] == s2["n"] == 10
    assert s1["accuracy"]["all"]["accuracy"] == s2["accuracy"]["all"]["accuracy"]
    assert s1["image_reliance"] == pytest.approx(s2["image_reliance"], abs=1e-5)


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate not installed")
def test_two_process_attribution_gives_the_same_scores(tmp_path):
    args = ["attribute", "--n-images", "3", "--masks", "32", "--no-compare", "--baseline", "zero"]
    _run_one_and_two_processes(args, tmp_path)
    assert (tmp_path / "two" / "per_image.rank1.jsonl").exists()
    a = json.loads((tmp_path / "one" / "heads.json").read_text())["heads"]
    b = json.loads((tmp_path / "two" / "heads.json").read_text())["heads"]
    assert [r["head"] for r in a] == [r["head"] for r in b]
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=1e-5)


def test_html_report_is_readable():
    """The report scrolls its table in a box, shows small p-values as < 0.001, lists settings as a
    table (not raw JSON) and explains its columns."""
    from headsteer.eval.comparison import html_report

    rows = [{"edit": "unedited", "n": 10, "accuracy": 0.9, "p_accuracy": float("nan")},
            {"edit": "a", "n": 10, "accuracy": 0.8, "p_accuracy": 1e-5}]
    h = html_report(rows, b"", None, "t", {"edits": {"a": "scale L0H0"}, "n": 10})
    assert "&lt; 0.001" in h and "0.0000" not in h
    assert "overflow-x:auto" in h and "<pre>" not in h
    assert "What the columns mean" in h and "image_reliance" in h
