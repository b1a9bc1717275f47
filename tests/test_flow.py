import numpy as np
import pytest
import torch
from click.testing import CliRunner

import headsteer
from headsteer import Knockout, intervene
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


@pytest.mark.parametrize("measure", ["prob", "logit"])
def test_empty_group_changes_nothing(default_model, measure):
    model, proc = default_model
    ex = load_easy_vqa("test", limit=1, qtypes=("shape",))[0]
    empty = np.zeros((64, 64), dtype=bool)  # no object patch: object->last knocks out nothing
    r = knockout_effects(model, proc, ex["image"], ex["question"], ex["answer"], object_mask=empty, measure=measure)
    assert all(abs(v) < 1e-5 for v in r["effects"]["object->last"])
    assert any(abs(v) > 1e-4 for v in r["effects"]["background->last"])


def test_logit_measure_matches_a_manual_knockout(default_model):
    model, proc = default_model
    ad = headsteer.get_adapter(model, proc)
    ex = load_easy_vqa("test", limit=1, qtypes=("shape",))[0]
    r = knockout_effects(model, proc, ex["image"], ex["question"], ex["answer"], measure="logit")
    inputs = ad.encode([ex["image"]], [ex["question"]])
    aid = ad.answer_token_id(ex["answer"])
    with torch.no_grad():
        clean = model(**inputs).logits[0, -1, aid].item()
        for layer in range(ad.num_layers):
            with intervene(model, knockouts=[Knockout("image", "last", heads=f"L{layer}H*")]):
                z = model(**inputs).logits[0, -1, aid].item()
            assert r["effects"]["image->last"][layer] == pytest.approx((z - clean) / abs(clean), abs=1e-5)
    with pytest.raises(headsteer.HeadsteerError, match="unknown measure"):
        knockout_effects(model, proc, ex["image"], ex["question"], ex["answer"], measure="loss")


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
    for name in ("flow.json", "flow.png", "summary.md"):
        assert (tmp_path / name).exists()
    assert "object->last" in r.output and "random heads of the same count" in r.output
