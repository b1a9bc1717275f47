import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import headsteer
from headsteer import HeadsteerError
from headsteer.attribution import ablated_logits
from headsteer.attribution.regression import fit, sample_masks, statistic
from headsteer.attribution.run import Settings, run_attribution
from headsteer.baseline import make_baseline
from headsteer.cli import main
from headsteer.data import load_easy_vqa


def test_regression_recovers_planted_heads():
    masks = sample_masks(400, 4, 8, 0.1, seed=0)
    w = torch.zeros(4, 8)
    w[2, 3], w[1, 0] = 3.0, 1.0
    y = 10 - (masks.float() * w).sum((1, 2)) + 0.05 * torch.randn(400, generator=torch.Generator().manual_seed(1))
    f = fit(masks, y)
    top = np.argsort(-f.scores.reshape(-1))[:2]
    assert set(top) == {2 * 8 + 3, 1 * 8 + 0}
    assert f.pearson > 0.95 and abs(f.intercept - 10) < 0.2
    assert fit(masks, y, "lasso").scores[2, 3] > 2.5


def test_statistic_margin_and_bad_input():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0]])
    assert statistic(logits, 1, "logit").tolist() == [3.0, 0.0]
    assert statistic(logits, 1, "margin").tolist() == [1.0, -5.0]
    assert statistic(logits, 1, "margin", candidates=[1, 2]).tolist() == [1.0, -1.0]
    with pytest.raises(HeadsteerError):
        sample_masks(3, 2, 2, 1.5)


@pytest.mark.parametrize("baseline", ["mean", "blank", "zero"])
def test_ablated_logits_fast_equals_naive_on_default_model(default_model, baseline):
    model, proc = default_model
    ex = load_easy_vqa("test", limit=1, qtypes=("shape",))[0]
    masks = sample_masks(12, 4, 8, 0.3, seed=2)
    masks[0] = False
    fast = ablated_logits(model, proc, ex["image"], ex["question"], masks, baseline=baseline)
    naive = ablated_logits(model, proc, ex["image"], ex["question"], masks, baseline=baseline, fast=False)
    assert fast.shape == (12, model.config.text_config.vocab_size)
    torch.testing.assert_close(fast, naive, atol=1e-4, rtol=0)
    with torch.no_grad():
        plain = model(**headsteer.get_adapter(model).encode([ex["image"]], [ex["question"]])).logits[0, -1]
    torch.testing.assert_close(fast[0], plain, atol=1e-4, rtol=0)


@pytest.mark.parametrize("baseline", ["mean", "blank", "zero"])
def test_all_heads_ablated_makes_answer_image_independent(default_model, baseline):
    model, proc = default_model
    ds = load_easy_vqa("test", limit=2, qtypes=("shape",))
    every = torch.ones(1, 4, 8, dtype=torch.bool)
    a = ablated_logits(model, proc, ds[0]["image"], "what shape is in the image?", every, baseline=baseline)
    other = load_easy_vqa("test", limit=40)[39]["image"]
    b = ablated_logits(model, proc, other, "what shape is in the image?", every, baseline=baseline)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_masks_shape_is_checked(default_model):
    model, proc = default_model
    ex = load_easy_vqa("test", limit=1)[0]
    with pytest.raises(HeadsteerError, match=r"masks must be bool \[M, 4, 8\]"):
        ablated_logits(model, proc, ex["image"], ex["question"], torch.zeros(2, 3, 8, dtype=torch.bool), baseline="zero")


def test_mean_baseline_is_cached(default_model, tmp_path):
    model, proc = default_model
    ims = [load_easy_vqa("train", limit=3)[i]["image"] for i in range(3)]
    b1 = make_baseline(model, proc, "mean", reference=ims, cache_dir=tmp_path)
    files = list(tmp_path.glob("baseline-mean-*.safetensors"))
    assert len(files) == 1
    b2 = make_baseline(model, proc, "mean", reference=ims, cache_dir=tmp_path)
    assert torch.equal(b1.keys, b2.keys) and b2.describe()["n"] == 3
    files[0].write_bytes(b"corrupt")
    with pytest.raises(HeadsteerError, match="cannot read baseline"):
        make_baseline(model, proc, "mean", reference=ims, cache_dir=tmp_path)


def test_interrupted_run_resumes_without_recomputing(default_model, tmp_path):
    model, proc = default_model
    ds = load_easy_vqa("test", limit=3, qtypes=("shape",))
    s = Settings(n_images=2, masks=24, compare=False, baseline="zero")
    rows = run_attribution(model, proc, ds, s, tmp_path)
    lines = (tmp_path / "per_image.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # a torn last line (killed mid-write) and one more image requested
    (tmp_path / "per_image.jsonl").write_text(lines[0] + "\n" + lines[1][:10])
    calls = []
    s3 = Settings(n_images=2, masks=24, compare=False, baseline="zero")
    rows2 = run_attribution(model, proc, ds, s3, tmp_path, progress=calls.append)
    assert len(calls) == 1  # only the torn image was recomputed
    assert rows2[0] == rows[0] and np.allclose(rows2[1]["scores"], rows[1]["scores"])
    with pytest.raises(HeadsteerError, match="other settings"):
        run_attribution(model, proc, ds, Settings(n_images=2, masks=30, compare=False, baseline="zero"), tmp_path)


def test_cli_attribute_writes_every_output(tmp_path):
    out = tmp_path / "att"
    r = CliRunner().invoke(main, ["attribute", "--n-images", "3", "--n-eval", "3", "--masks", "48", "--alpha", "0.1,0.6",
                                  "--n-random", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    for name in ("scores.safetensors", "heads.json", "heatmap.png", "topk_curve.png", "layers.png", "summary.md",
                 "per_image.jsonl", "report.html"):
        assert (out / name).exists(), name
    assert set(json.loads((out / "run.json").read_text())["written"]) >= {"topk_curve.png", "layers.png", "report.html"}
    assert "report.html" in next(line for line in r.output.splitlines() if line.startswith("wrote "))
    data = json.loads((out / "heads.json").read_text())
    assert len(data["heads"]) == 32 and data["baseline"]["kind"] == "mean"
    assert "faithfulness" not in data and set(data["fit_correlation"]) >= {"pearson", "spearman"}
    c = data["curves"]
    # the atp* ranking joins every run with comparisons (a gradient baseline; --scorer coar is the default)
    assert set(c["rankings"]) == {"attribution@0.1", "attribution@0.6", "atp*", "single-head", "attention", "random"}
    assert data["scorer"] == "coar"
    assert c["k"] == list(range(33)) and c["denominator"]["n_images"] == 3
    for name, r in c["rankings"].items():
        assert r["faithfulness"]["mean"][0] == 0 and r["faithfulness"]["mean"][32] == pytest.approx(1)
        assert r["completeness"]["mean"][0] == 0 and r["completeness"]["mean"][32] == pytest.approx(1)
        assert set(data["heads_needed"][name]["faithfulness"]) == {"0.5", "0.8", "0.9"}
    assert [r["alpha"] for r in data["rates"]] == [0.1, 0.6] and data["primary_alpha"] == 0.1
    assert data["rates"][0]["heads"][0]["head"] == data["heads"][0]["head"]
    assert sum(data["layer_profile"]["count_per_layer"]) == 3 and "spearman" in data["attention_correlation"]
    assert {data["regimes"]["keep_only"]["alpha"], data["regimes"]["removal"]["alpha"]} <= {0.1, 0.6}
    summary = (out / "summary.md").read_text()
    assert summary.splitlines()[2].startswith("**Heads needed for 80%") and "Where the heads sit" in summary
    scores = headsteer.attribution.report.load_scores(out)
    assert scores["per_image"].shape == (3, 4, 8) and scores["mean@0.6"].shape == (4, 8) and scores["atp*"].shape == (4, 8)
    # report.html: both rates' grids, the images with their object masks (test_report_html.py has the rest)
    page = (out / "report.html").read_text()
    blob = json.loads(re.search(r"id='headsteer-data'>(.*?)</script>", page, re.S).group(1))
    assert [r["alpha"] for r in blob["rates"]] == [0.1, 0.6] and len(blob["per_image"]) == 3
    np.testing.assert_allclose(blob["rates"][1]["mean"], scores["mean@0.6"].numpy().ravel(), rtol=1e-3, atol=1e-6)
    assert all("mask" in blob["images"][r["image"]] for r in blob["per_image"])
    assert not list(out.glob("*.tmp"))
    # the edit commands pick a rate's ranking
    from headsteer.heads import select_heads, top_heads

    assert str(top_heads(out, 2, alpha=0.6)) == str(headsteer.HeadSet.parse(",".join(h["head"] for h in data["rates"][1]["heads"][:2])))
    assert top_heads(out, 2) == top_heads(out, 2, alpha=0.1)
    keep = data["regimes"]["keep_only"]["alpha"]
    assert top_heads(out, 3, alpha="keep-only") == top_heads(out, 3, alpha=keep)
    hs, info = select_heads(None, out, 2, num_layers=4, num_heads=8, rate=0.6)
    assert info["alpha"] == 0.6 and hs == top_heads(out, 2, alpha=0.6)
    with pytest.raises(HeadsteerError, match="rates 0.1, 0.6"):
        top_heads(out, 2, alpha=0.3)
    r = CliRunner().invoke(main, ["edit", "scale", "--from-attribution", str(out), "--top-k", "2", "--rate", "0.6",
                                  "--factor", "0", "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    edit = json.loads((tmp_path / "e.json").read_text())
    assert edit["heads"] == str(top_heads(out, 2, alpha=0.6))


def test_cli_attribute_on_a_local_data_file(tmp_path):
    """A user's own VQA file: the mean baseline comes from its own images."""
    from PIL import Image

    rows = []
    for i, (shape_box, colour) in enumerate([((10, 10, 40, 40), (200, 0, 0)), ((20, 5, 60, 30), (0, 0, 200)),
                                              ((5, 30, 30, 60), (0, 150, 0)), ((30, 30, 50, 50), (200, 200, 0))]):
        im = Image.new("RGB", (64, 64), (240, 235, 230))
        im.paste(colour, shape_box)
        im.save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "what color is the shape?", "answer": ["red", "blue", "green", "yellow"][i]})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "att"
    r = CliRunner().invoke(main, ["attribute", "--data", str(tmp_path / "data.jsonl"), "--n-images", "2", "--n-eval", "2",
                                  "--masks", "32", "--k-max", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "heads.json").read_text())
    assert data["baseline"]["kind"] == "mean" and data["baseline"]["reference"].startswith("user(4)")
    assert data["n_images"] == 2
