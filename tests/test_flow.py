import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import headsteer
from headsteer import Knockout, intervene
from headsteer.attribution import flow as flow_mod
from headsteer.attribution.flow import knockout_effects, patch_mask, windows
from headsteer.cli import main
from headsteer.data import load_easy_vqa


def test_patch_mask_grid_and_boxes():
    m = np.zeros((64, 64), dtype=bool)
    m[0:8, 0:16] = True
    pm = patch_mask(m, 64)
    assert pm.sum() == 2 and pm[0] and pm[1] and not pm[8]
    box = patch_mask((56, 56, 64, 64, 64, 64), 64)
    assert box.sum() == 1 and box[63]
    with pytest.raises(headsteer.HeadsteerError, match="square grid"):
        patch_mask(m, 60)
    assert windows(4, 2) == [[0, 1], [1, 2], [2, 3]]


def test_image_to_everything_knockout_makes_logits_image_independent(default_model):
    model, proc = default_model
    ad = headsteer.get_adapter(model, proc)
    ds = load_easy_vqa("test", limit=30)
    a_in = ad.encode([ds[0]["image"]], ["what shape is in the image?"])
    b_in = ad.encode([ds[29]["image"]], ["what shape is in the image?"])
    with torch.no_grad():
        assert (model(**a_in).logits[0, -1] - model(**b_in).logits[0, -1]).abs().max() > 1e-3
        with intervene(model, knockouts=[Knockout("image", "text")]):
            a, b = model(**a_in).logits[0, -1], model(**b_in).logits[0, -1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("measure", ["prob", "logit_diff", "image_frac"])
def test_empty_group_changes_nothing(default_model, measure):
    model, proc = default_model
    ex = load_easy_vqa("test", limit=1, qtypes=("shape",))[0]
    empty = np.zeros((64, 64), dtype=bool)  # no object patch: object->last knocks out nothing
    r = knockout_effects(model, proc, ex["image"], ex["question"], ex["answer"], object_mask=empty, measure=measure)
    assert all(abs(v) < 1e-5 for v in r["effects"]["object->last"])
    assert any(abs(v) > 1e-4 for v in r["effects"]["background->last"])


def test_logit_measures_match_a_manual_knockout(default_model):
    model, proc = default_model
    ad = headsteer.get_adapter(model, proc)
    ex = load_easy_vqa("test", limit=1, qtypes=("shape",))[0]
    diff = knockout_effects(model, proc, ex["image"], ex["question"], ex["answer"], measure="logit_diff")
    frac = knockout_effects(model, proc, ex["image"], ex["question"], ex["answer"], measure="image_frac")
    inputs = ad.encode([ex["image"]], [ex["question"]])
    aid = ad.answer_token_id(ex["answer"])
    with torch.no_grad():
        clean = model(**inputs).logits[0, -1, aid].item()
        with intervene(model, knockouts=[Knockout("image", "text")]):  # the image removed from every text position
            no_image = model(**inputs).logits[0, -1, aid].item()
        for layer in range(ad.num_layers):
            with intervene(model, knockouts=[Knockout("image", "last", heads=f"L{layer}H*")]):
                z = model(**inputs).logits[0, -1, aid].item()
            assert diff["effects"]["image->last"][layer] == pytest.approx(z - clean, abs=1e-4)
            assert frac["effects"]["image->last"][layer] == pytest.approx((z - clean) / abs(no_image - clean), abs=1e-5)
    assert frac["image_effect"] == pytest.approx(no_image - clean, abs=1e-4)
    with pytest.raises(headsteer.HeadsteerError, match="unknown measure"):
        knockout_effects(model, proc, ex["image"], ex["question"], ex["answer"], measure="loss")


@pytest.mark.parametrize("measure", ["prob", "logit_diff", "image_frac", "logit"])
def test_flow_measures_do_not_depend_on_a_constant_added_to_the_logits(default_model, measure):
    """Logits are defined up to a constant: a measure must not change when one is added."""
    model, proc = default_model
    ex = load_easy_vqa("test", limit=1, qtypes=("shape",))[0]
    if measure not in flow_mod.MEASURES:  # the old ratio to a raw logit is gone, with a message naming the fix
        with pytest.raises(headsteer.HeadsteerError, match="logit_diff"):
            knockout_effects(model, proc, ex["image"], ex["question"], ex["answer"], measure=measure)
        return
    plain = knockout_effects(model, proc, ex["image"], ex["question"], ex["answer"], measure=measure)
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: out - 7.0)
    try:
        shifted = knockout_effects(model, proc, ex["image"], ex["question"], ex["answer"], measure=measure)
    finally:
        handle.remove()
    for e, vals in plain["effects"].items():
        assert shifted["effects"][e] == pytest.approx(vals, abs=1e-4), e


def test_flow_summary_names_the_measure_and_reports_tiny_denominators():
    flow = {"windows": [[0, 0], [1, 1]], "n_images": 3, "measure": "image_frac", "clean_mean": 9.0,
            "image_effect_mean": -2.0, "excluded_images": 1, "edges": {"image->last": [-0.25, 0.0]}}
    text = "\n".join(flow_mod.describe(flow))
    assert "-25.0%" in text and "image knockout" in text and "1 image" in text
    flow.update(measure="logit_diff", edges={"image->last": [-0.25, 0.0]})
    assert "-0.250" in "\n".join(flow_mod.describe(flow))


def test_knockout_is_identical_with_left_padding(default_model):
    model, proc = default_model
    ad = headsteer.get_adapter(model, proc)
    ds = load_easy_vqa("test", limit=6)
    qs = ["what shape is in the image?", "is there a red shape in the image?"]
    ims = [ds[0]["image"], ds[5]["image"]]
    batch = ad.encode(ims, qs)
    assert (batch["attention_mask"] == 0).any()  # the shorter prompt is left-padded
    ko = [Knockout("question", "last", heads="L1H*,L2H*"), Knockout("image", "role", heads="L0H0-3")]
    with torch.no_grad(), intervene(model, knockouts=ko):
        both = model(**batch).logits[:, -1]
        for i in range(2):
            alone = model(**ad.encode([ims[i]], [qs[i]])).logits[0, -1]
            torch.testing.assert_close(both[i], alone, atol=1e-5, rtol=1e-5)


def test_cli_flow(tmp_path):
    r = CliRunner().invoke(main, ["flow", "--n-images", "2", "--window", "2", "--heads", "L1H0,L2H3", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    for name in ("flow.json", "flow.png", "summary.md", "report.html"):
        assert (tmp_path / name).exists()
    flow = json.loads((tmp_path / "flow.json").read_text())
    page = (tmp_path / "report.html").read_text()
    blob = json.loads(re.search(r"id='headsteer-data'>(.*?)</script>", page, re.S).group(1))
    assert blob["kind"] == "flow" and set(blob["flow"]["edges"]) == set(flow["edges"]) and blob["flow"]["heads"] == "L1H0,L2H3"
    assert "report.html" in next(line for line in r.output.splitlines() if line.startswith("wrote "))
    assert "object->last" in r.output and "random heads of the same count" in r.output
