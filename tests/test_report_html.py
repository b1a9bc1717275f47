"""report.html of `headsteer attribute` and `headsteer flow` (attribution/html_report.py): one
self-contained file, the numbers in it, strings from the data kept as text. The page in a real
browser: tests/test_report_browser.py."""
import base64
import hashlib
import io
import re

import numpy as np
import pytest
from PIL import Image
from report_pages import EVIL, attribution_page, blob, blob_text, flow_page, shape_example

from headsteer.attribution.html_report import THUMB_SIDE, _json_for_script, image_entry
from headsteer.data import load_easy_vqa

SVG_NS = "http://www.w3.org/2000/svg"


def assert_self_contained(text: str):
    # the only URL in the page is the SVG namespace name, which the renderer passes to createElementNS
    assert set(re.findall(r"https?://[^\s\"'<>)\\]*", text)) <= {SVG_NS}
    assert not re.search(r"<(link|iframe|object|embed|base)\b", text, re.I)
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?(?!data:)", text, re.I)
    assert not re.search(r"\b(src|href)\s*=\s*['\"]?(?!data:)[a-z]+:", text, re.I)
    assert text.count("<script") == 2  # the data blob and the renderer
    # the browser enforces it too: no source but data: images, and only the renderer's script, by hash
    csp = re.search(r"http-equiv='Content-Security-Policy' content=\"([^\"]*)\"", text).group(1)
    assert "default-src 'none'" in csp and "img-src data:" in csp and "unsafe-inline" not in csp.split("script-src")[1]
    script = re.search(r"<script>(.*)</script></body>", text, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp


def test_attribute_report_is_self_contained_and_holds_the_grid():
    text, data, agg, rows = attribution_page(n=5, L=2, H=3, rates=(0.1, 0.5))
    assert_self_contained(text)
    d = blob(text)
    assert d["kind"] == "attribute" and (d["L"], d["H"]) == (2, 3)
    assert [r["alpha"] for r in d["rates"]] == [0.1, 0.5]
    for r in d["rates"]:  # each rate's grid: mean, stderr and top-5 frequency of every head, l * H + h
        a = agg["rates"][r["key"]]
        np.testing.assert_allclose(r["mean"], a["mean"].ravel(), rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(r["stderr"], a["stderr"].ravel(), rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(r["topk_freq"], a["topk_freq"].ravel(), rtol=1e-3, atol=1e-6)
    assert not np.allclose(d["rates"][0]["mean"], d["rates"][1]["mean"])
    np.testing.assert_allclose(d["single"], agg["single"].ravel(), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(d["attention"], agg["attention"].ravel(), rtol=1e-3, atol=1e-6)
    # each image's own scores at each rate (its top heads come from these)
    np.testing.assert_allclose(d["per_image"][3]["scores"]["0.5"], np.ravel(rows[3]["rates"]["0.5"]["scores"]), rtol=1e-3, atol=1e-6)
    assert set(d["curves"]["rankings"]) == {"attribution@0.1", "attribution@0.5", "single-head", "attention", "random"}
    assert d["rates"][1]["ranking"] == "attribution@0.5" and d["rates"][0]["layer_profile"]["top_n"] == 1


def test_user_strings_stay_text():
    text, *_ = attribution_page(n=3, questions=[EVIL, "plain?", "a & b"], curves=False)
    assert_self_contained(text)
    assert text.count("data-pwned") == 2  # only inside the blob (below), as JSON text
    payload = blob_text(text)
    assert "<" not in payload and ">" not in payload and "&" not in payload  # cannot close its element or open a tag
    assert blob(text)["per_image"][0]["question"] == EVIL  # and reads back exactly
    assert _json_for_script({"q": "\u2028</script>"}) == '{"q":"\\u2028\\u003c/script\\u003e"}'


def test_numbers_without_a_value_are_null_not_nan():
    text, data, agg, rows = attribution_page(n=1, L=2, H=3, rates=(0.1,))  # one image: no stderr over images
    d = blob(text)  # strict: NaN/Infinity would fail
    assert d["rates"][0]["stderr"] == [0.0] * 6
    assert all(r["fit_pearson"] == 0.9 for r in d["per_image"])


def test_images_masks_and_boxes():
    shape = shape_example(box=(10, 20, 30, 40))
    e = image_entry(shape)
    assert e["src"].startswith("data:image/") and (e["w"], e["h"]) == (64, 64) and e["mask_from"] == "object_mask"
    assert e["object_share"] == pytest.approx(20 * 20 / 64 ** 2, rel=1e-3)
    Image.open(io.BytesIO(base64.b64decode(e["mask"].split(",", 1)[1]))).verify()
    # a large photo with a box: thumbnail at most THUMB_SIDE, the box scaled with it
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    e = image_entry({"image": photo, "object_box": [0, 0, 320, 240, 640, 480]})
    assert (e["w"], e["h"]) == (THUMB_SIDE, THUMB_SIDE * 3 // 4) and e["size"] == [640, 480] and e["mask_from"] == "box"
    assert e["object_share"] == pytest.approx(0.25, abs=0.02)
    assert "mask" not in image_entry({"image": photo, "object_box": None})  # no mask: the image only
    assert image_entry({"question": "no image"}) is None
    # one entry per distinct image; each row points at its own
    same = shape_example(box=(10, 20, 30, 40))
    other = shape_example(box=(40, 40, 60, 60), colour=(0, 0, 200))
    text, *_ = attribution_page(examples=[same, other, shape, {"image": photo}, {"q": 1}], n=5, curves=False)
    d = blob(text)
    keys = [r["image"] for r in d["per_image"]]
    assert keys[0] == keys[2] != keys[1] and keys[4] is None and len(d["images"]) == 3
    assert "mask" not in d["images"][keys[3]] and "mask" in d["images"][keys[1]]


def test_a_forty_image_default_shaped_report_is_small():
    """The default model's shape (4 layers x 8 heads), 40 easy-VQA images, curves over every k."""
    ds = load_easy_vqa("test", limit=40, qtypes=("shape",))
    text, *_ = attribution_page(examples=[ds[i] for i in range(40)], n=40, L=4, H=8, rates=(0.1,))
    assert len(blob(text)["images"]) >= 10
    assert len(text.encode()) < 400_000, len(text.encode())


@pytest.mark.parametrize("measure", ["image_frac", "logit_diff"])
def test_flow_report(measure):
    text = flow_page(measure)
    assert_self_contained(text)
    d = blob(text)  # strict: NaN/Infinity would fail
    assert d["kind"] == "flow" and d["flow"]["measure"] == measure
    assert d["flow"]["edges"]["image->last"] == [-0.1, -0.5, None]  # NaN (no image to average over) -> null
