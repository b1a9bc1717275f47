import json

import numpy as np
import pytest
from PIL import Image

from headsteer import HeadsteerError
from headsteer.data import load_easy_vqa, load_local_vqa, object_mask


def test_easy_vqa_columns_and_object_mask():
    ds = load_easy_vqa("test", limit=20)
    assert len(ds) == 20
    row = ds[0]
    assert set(row) >= {"image", "question", "answer", "answers", "qtype", "image_id", "object_mask"}
    assert row["qtype"] in ("shape", "color", "yes/no")
    mask = np.asarray(row["object_mask"])
    assert mask.shape == (64, 64) and 0 < mask.mean() < 0.9  # a shape on a background


def test_object_mask_finds_a_drawn_square():
    im = Image.new("RGB", (64, 64), (240, 230, 220))
    im.paste((10, 20, 200), (16, 16, 32, 40))
    m = object_mask(im)
    assert m.sum() == 16 * 24 and m[20, 20] and not m[0, 0]


def test_qtype_filter():
    ds = load_easy_vqa("test", limit=50, qtypes=("shape", "color"))
    assert set(ds["qtype"]) <= {"shape", "color"} and len(ds) == 50


def _write_images(tmp_path, n=3):
    for i in range(n):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")


def test_local_jsonl_csv_and_folder(tmp_path):
    _write_images(tmp_path)
    rows = [{"image": f"{i}.png", "question": "what colour?", "answers": ["red", "red", "dark red"]} for i in range(3)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_local_vqa(tmp_path / "data.jsonl")
    assert len(ds) == 3 and ds[0]["answer"] == "red" and ds[0]["answers"] == ["red", "red", "dark red"]
    assert load_local_vqa(tmp_path)[1]["question"] == "what colour?"  # the folder form
    (tmp_path / "q.csv").write_text("image,question,answer\n0.png,is it red?,yes\n")
    assert load_local_vqa(tmp_path / "q.csv")[0]["answers"] == ["yes"]


def test_local_errors_are_one_line(tmp_path):
    _write_images(tmp_path, 1)
    (tmp_path / "a.jsonl").write_text(json.dumps({"img_name": "0.png", "question": "q", "answer": "a"}))
    with pytest.raises(HeadsteerError, match="missing column.*image"):
        load_local_vqa(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text(json.dumps({"image": "nope.png", "question": "q", "answer": "a"}))
    with pytest.raises(HeadsteerError, match="image not found"):
        load_local_vqa(tmp_path / "b.jsonl")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "bad.png", "question": "q", "answer": "a"}))
    with pytest.raises(HeadsteerError, match="cannot read image"):
        load_local_vqa(tmp_path / "c.jsonl")


def test_local_boxes_become_object_patches(tmp_path, default_model):
    from headsteer.attribution.flow import flow_dataset

    im = Image.new("RGB", (128, 128), (255, 255, 255))
    im.paste((200, 0, 0), (0, 0, 64, 64))
    im.save(tmp_path / "0.png")
    rows = [{"image": "0.png", "question": "what shape is in the image?", "answer": "rectangle", "box": [0, 0, 64, 64]}]
    (tmp_path / "d.jsonl").write_text(json.dumps(rows[0]))
    ds = load_local_vqa(tmp_path / "d.jsonl")
    assert ds[0]["object_box"] == [0, 0, 64, 64, 128, 128]
    model, proc = default_model
    flow = flow_dataset(model, proc, ds, n_images=1, measure="logit_diff")
    assert {"object->last", "background->last"} <= set(flow["edges"])
    (tmp_path / "e.jsonl").write_text(json.dumps({**rows[0], "box": "0,0,300,10"}))
    with pytest.raises(HeadsteerError, match="box .* inside a 128x128 image"):
        load_local_vqa(tmp_path / "e.jsonl")
