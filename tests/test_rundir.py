"""A run folder has an identity: resume only into the same one, refuse otherwise, never delete what
headsteer did not write; outputs are written atomically with the user's umask."""
import json
import os
import stat

import pytest
import torch
from click.testing import CliRunner

import headsteer
from headsteer import HeadsteerError
from headsteer.attribution import pipeline
from headsteer.attribution.pipeline import attribute_dataset
from headsteer.attribution.run import Settings, run_attribution
from headsteer.baseline import make_baseline
from headsteer.cli import main
from headsteer.data import load_easy_vqa
from headsteer.edit import EditManifest
from headsteer.eval import evaluate, summary

ALL_ZERO = EditManifest("scale", "L0-3H0-7", {"factor": 0.0})


def _acc(rows):
    return summary(rows)["accuracy"]["all"]["accuracy"]


@pytest.fixture
def k_proj_scaled(default_model):
    """A text layer's k_proj scaled by 3 for the duration of a test (the session model is restored)."""
    model, _ = default_model
    w = model.model.language_model.layers[1].self_attn.k_proj.weight
    saved = w.detach().clone()

    def scale():
        with torch.no_grad():
            w.mul_(3.0)

    yield scale
    with torch.no_grad():
        w.copy_(saved)


# -- item 1: eval / compare resume ignored the edit ----------------------------------------------

def test_eval_into_another_edits_folder_refuses_and_force_gives_the_fresh_numbers(default_model, tmp_path):
    model, proc = default_model
    ds = load_easy_vqa("test", limit=8)
    out = tmp_path / "ev"
    assert _acc(evaluate(model, proc, ds, ("accuracy",), out_dir=out)) == 1.0
    with pytest.raises(HeadsteerError, match=r"differs in: .*edit.*--force"):
        evaluate(model, proc, ds, ("accuracy",), edit=ALL_ZERO, out_dir=out)
    fresh = evaluate(model, proc, ds, ("accuracy",), edit=ALL_ZERO)
    forced = evaluate(model, proc, ds, ("accuracy",), edit=ALL_ZERO, out_dir=out, force=True)
    assert _acc(forced) == _acc(fresh) < 0.5
    assert [r["prediction"] for r in forced] == [r["prediction"] for r in fresh]
    again = evaluate(model, proc, ds, ("accuracy",), edit=ALL_ZERO, out_dir=out)  # same identity: resumes
    assert [r["prediction"] for r in again] == [r["prediction"] for r in fresh]


def test_cli_eval_refuses_another_edit_and_never_deletes_foreign_files(tmp_path):
    ALL_ZERO.save(tmp_path / "zero.json")
    out = tmp_path / "ev"
    args = ["eval", "--limit", "8", "--metrics", "accuracy", "--out", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    r = CliRunner().invoke(main, [*args, "--edit", str(tmp_path / "zero.json")])
    assert r.exit_code == 1 and "--force" in r.output and "edit" in r.output and "Traceback" not in r.output
    (out / "my_notes.txt").write_text("mine")
    r = CliRunner().invoke(main, [*args, "--edit", str(tmp_path / "zero.json"), "--force"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["accuracy"]["all"]["accuracy"] < 0.5 and s["edit"].startswith("scale")
    assert (out / "my_notes.txt").read_text() == "mine"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("x")
    for extra in ([], ["--force"]):
        r = CliRunner().invoke(main, ["eval", "--limit", "2", "--metrics", "accuracy", "--out", str(foreign), *extra])
        assert r.exit_code == 1 and "not written by headsteer" in r.output
    assert os.listdir(foreign) == ["data.csv"]


def test_cli_compare_keeps_edits_with_the_same_stem_apart_and_the_reference_first(tmp_path):
    for d, e in (("d1", EditManifest("scale", "L0H0", {"factor": 0.0})), ("d2", ALL_ZERO)):
        (tmp_path / d).mkdir()
        e.save(tmp_path / d / "a.json")
    EditManifest("attn", "L1H1", {"alpha": 1.0}).save(tmp_path / "unedited.json")
    paths = [str(tmp_path / "d1" / "a.json"), str(tmp_path / "d2" / "a.json"), str(tmp_path / "unedited.json")]
    out = tmp_path / "cmp"
    r = CliRunner().invoke(main, ["compare", "--edits", *paths, "--limit", "8", "--metrics", "accuracy", "--out", str(out)])
    assert r.exit_code == 0, r.output
    lines = (out / "compare.csv").read_text().splitlines()
    rows = [dict(zip(lines[0].split(","), l.split(","))) for l in lines[1:]]
    assert len(rows) == 4 and rows[0]["edit"] == "unedited" and len({r["edit"] for r in rows}) == 4
    assert float(rows[0]["accuracy"]) == 1.0  # the reference is the unedited model, not unedited.json
    by_name = {r["edit"]: float(r["accuracy"]) for r in rows}
    d2 = next(n for n in by_name if "d2" in n)
    assert by_name[d2] < 0.5 and all(by_name[n] == 1.0 for n in by_name if "d1" in n)


def test_library_compare_rejects_an_edit_named_like_the_reference(default_model, tmp_path):
    from headsteer.eval.comparison import compare

    model, proc = default_model
    with pytest.raises(HeadsteerError, match="unedited"):
        compare(model, proc, load_easy_vqa("test", limit=2), {"unedited": ALL_ZERO}, tmp_path, metrics=("accuracy",))


# -- item 2: attribution resume ignored model, data, qtype, dtype --------------------------------

def test_attribution_resume_refuses_another_qtype_and_another_model(default_model, tmp_path, k_proj_scaled):
    model, proc = default_model
    s = Settings(n_images=2, masks=16, compare=False, baseline="zero")
    shape = load_easy_vqa("test", limit=2, qtypes=("shape",))
    color = load_easy_vqa("test", limit=2, qtypes=("color",))
    run_attribution(model, proc, shape, s, tmp_path)
    with pytest.raises(HeadsteerError, match=r"differs in: .*qtype"):
        run_attribution(model, proc, color, s, tmp_path)
    rows = run_attribution(model, proc, color, s, tmp_path, force=True)
    assert [r["answer"] for r in rows] == color["answer"]
    k_proj_scaled()
    with pytest.raises(HeadsteerError, match=r"differs in: .*weights"):
        run_attribution(model, proc, color, s, tmp_path)


def test_cli_attribute_refuses_a_colour_run_in_a_shape_runs_folder(tmp_path):
    out = tmp_path / "att"
    args = ["attribute", "--n-images", "2", "--masks", "16", "--no-compare", "--baseline", "zero", "--out", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    r = CliRunner().invoke(main, [*args, "--qtype", "color"])
    assert r.exit_code == 1 and "qtype" in r.output and "--force" in r.output
    r = CliRunner().invoke(main, [*args, "--qtype", "color", "--force"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(l) for l in (out / "per_image.jsonl").read_text().splitlines()]
    assert {r["qtype"] for r in rows} == {"color"}
    ident = json.loads((out / "run.json").read_text())["identity"]
    assert ident["data"]["qtypes"] == ["color"] and ident["command"] == "attribute"


# -- item 3: the mean-baseline cache key ignored the language model ------------------------------

def test_weights_fingerprint_sees_one_text_weight(default_model, k_proj_scaled):
    from headsteer.fingerprint import weights_fingerprint

    model, _ = default_model
    before = weights_fingerprint(model)
    assert weights_fingerprint(headsteer.load("default")[0]) == before
    k_proj_scaled()
    assert weights_fingerprint(model) != before


def test_mean_baseline_cache_key_changes_with_a_text_layer(default_model, tmp_path, k_proj_scaled):
    model, proc = default_model
    ims = [load_easy_vqa("train", limit=2)[i]["image"] for i in range(2)]
    b1 = make_baseline(model, proc, "mean", reference=ims, cache_dir=tmp_path)
    k_proj_scaled()
    b2 = make_baseline(model, proc, "mean", reference=ims, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("baseline-mean-*.safetensors"))) == 2
    assert not torch.allclose(b1.keys[1], b2.keys[1])


# -- items 4 and 5: similarity labels from the right split; no held-out images, no curves ---------

def test_similarity_labels_come_from_the_data_split(default_model, tmp_path, monkeypatch):
    model, proc = default_model
    seen = {}

    def spy(scores, semantic, appearance):
        seen.update(semantic=semantic, appearance=appearance)
        return {}

    monkeypatch.setattr(pipeline, "group_similarity", spy)
    ds = load_easy_vqa("train", limit=6, qtypes=("shape",))
    rows_ids = ds["image_id"][:6]
    attribute_dataset(model, proc, ds, Settings(n_images=6, masks=8, compare=False, baseline="zero"), tmp_path)
    assert list(rows_ids)[0] == 0
    assert seen["semantic"][0] == "rectangle" and seen["appearance"][0] == "blue"
    assert seen["semantic"] == list(ds["answer"][:6])


def test_no_held_out_images_means_no_curves_and_says_so(default_model, tmp_path):
    model, proc = default_model
    ds = load_easy_vqa("test", limit=3, qtypes=("shape",))
    data = attribute_dataset(model, proc, ds, Settings(n_images=3, masks=16, baseline="zero"), tmp_path, k_max=2, n_eval=0)
    assert "topk_curves" not in data and not (tmp_path / "topk_curve.png").exists()
    heads = json.loads((tmp_path / "heads.json").read_text())
    assert heads["held_out"]["n_images"] == 0 and "topk_curves" not in heads
    assert "0 held-out images" in (tmp_path / "summary.md").read_text()


# -- the run folder and the file writer ----------------------------------------------------------

def test_run_folder_open_resume_refuse_and_force(tmp_path):
    from headsteer.rundir import open_run

    ident = {"command": "eval", "settings": {"a": 1}, "edit": None}
    r = open_run(tmp_path / "run", ident, outputs=["rows.jsonl"])
    assert not r.resumed and (tmp_path / "run" / "run.json").exists()
    (tmp_path / "run" / "rows.jsonl").write_text("1\n")
    (tmp_path / "run" / "user.txt").write_text("mine")
    assert open_run(tmp_path / "run", ident, outputs=["rows.jsonl"]).resumed
    with pytest.raises(HeadsteerError, match=r"differs in: edit, settings.a\); pass --force"):
        open_run(tmp_path / "run", {**ident, "settings": {"a": 2}, "edit": "x"})
    r = open_run(tmp_path / "run", {**ident, "edit": "x"}, force=True)
    assert not r.resumed and sorted(os.listdir(tmp_path / "run")) == ["headsteer.log", "run.json", "user.txt"]
    (tmp_path / "empty").mkdir()
    assert not open_run(tmp_path / "empty", ident).resumed
    with pytest.raises(HeadsteerError, match="not written by headsteer"):
        open_run(tmp_path, ident, force=True)


def test_atomic_files_get_the_umask_permissions(tmp_path):
    from headsteer import files

    old = os.umask(0o022)
    try:
        files.save_safetensors({"x": torch.zeros(2)}, tmp_path / "a.safetensors", metadata={"k": "v"})
        files.write_json(tmp_path / "a.json", {"a": 1})
        files.write_text(tmp_path / "a.txt", "hi")
    finally:
        os.umask(old)
    for name in ("a.safetensors", "a.json", "a.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.safetensors", "a.txt"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 1}


def test_cli_flow_refuses_another_runs_folder_and_reruns_its_own(tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(main, ["attribute", "--n-images", "2", "--masks", "8", "--no-compare", "--baseline", "zero",
                                     "--out", str(out)]).exit_code == 0
    flow = ["flow", "--n-images", "1", "--window", "4"]
    r = CliRunner().invoke(main, [*flow, "--out", str(out)])
    assert r.exit_code == 1 and "differs in: command" in r.output and (out / "per_image.jsonl").exists()
    for _ in range(2):  # flow does not resume, and its own folder is not "another run"
        r = CliRunner().invoke(main, [*flow, "--out", str(tmp_path / "flow")])
        assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "flow" / "run.json").read_text())["identity"]["command"] == "flow"


def test_tensor_fingerprint_is_the_wrapping_integer_sum(monkeypatch):
    """The device reduction equals the same sum in exact integers mod 2^64, whatever the chunking
    (so CPU, GPU and any reduction order agree)."""
    from headsteer import fingerprint as fp

    x = torch.randn(1000, dtype=torch.float32)
    monkeypatch.setattr(fp, "_CHUNK", 96)
    monkeypatch.setattr(fp, "_weights_cache", {})
    got = fp.tensor_fingerprint(x)
    w = fp._position_weights("cpu").tolist()
    bits = x.view(torch.int32).tolist()
    mod = 1 << 64
    total = sum((b * w[i % 96] % mod) * (fp._chunk_weight(i // 96) % mod) for i, b in enumerate(bits)) % mod
    assert got % mod == total
    y = x.clone()
    y[999] = -y[999]
    assert fp.tensor_fingerprint(y) != got and fp.tensor_fingerprint(x.to(torch.bfloat16)) != got


def test_a_run_folder_refuses_a_model_under_an_open_intervention(default_model, tmp_path):
    from headsteer import Spec, intervene

    model, proc = default_model
    ds = load_easy_vqa("test", limit=2)
    with intervene(model, Spec(head_scale=torch.zeros(4, 8))):
        with pytest.raises(HeadsteerError, match="pass the edit as edit="):
            evaluate(model, proc, ds, ("accuracy",), out_dir=tmp_path / "ev")
    assert len(evaluate(model, proc, ds, ("accuracy",), out_dir=tmp_path / "ev")) == 2


def test_compare_edit_names_are_distinct_and_short():
    from headsteer.eval.cli import edit_names

    assert edit_names(["/x/d1/a.json", "/x/d2/a.json", "b.json", "b.json", "x/unedited.json"]) == \
        ["d1/a", "d2/a", "b", "b #2", "x/unedited"]
    assert edit_names(["a.json", "unedited.json"]) == ["a", "unedited.json"]
