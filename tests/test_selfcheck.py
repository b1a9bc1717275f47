"""Every run checks its own engine on its first example (headsteer/selfcheck.py). The checks pass on a
sound engine and record their figures in run.json; broken on purpose — a fast path whose prefix is one
token short, a cache whose length is off by one while decoding — a run falls back to the naive path
(attribute) or stops with one line naming the check, the family and the transformers version (eval
--mode open under an edit), and never prints numbers from the broken path."""
import importlib
import json
import logging

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from headsteer.attribution.run import Settings, run_attribution
from headsteer.cli import main
from headsteer.data import load_easy_vqa
from headsteer.edit import EditManifest
from headsteer.eval import evaluate
from headsteer.selfcheck import SelfCheckFailed, compare, tolerance, ulp
from headsteer.versions import untested_transformers

fastpath = importlib.import_module("headsteer.fastpath")
intervene_mod = importlib.import_module("headsteer.intervention")


def _run_json(folder):
    return json.loads((folder / "run.json").read_text())


@pytest.fixture
def prefix_one_short(monkeypatch):
    """The fast path's shared prefix believes it is one token shorter than it is."""
    real = fastpath.seen_tokens
    monkeypatch.setattr(fastpath, "seen_tokens", lambda cache: real(cache) - 1)


@pytest.fixture
def decode_positions_off_by_one(monkeypatch):
    """While decoding, the intervention layer believes the cache holds one token more than it does."""
    real = intervene_mod.seen_tokens
    monkeypatch.setattr(intervene_mod, "seen_tokens", lambda cache: real(cache) + 1 if real(cache) else 0)


def test_tolerances():
    assert tolerance(torch.float32, 13.0) == pytest.approx(1.3e-3)
    assert tolerance(torch.float32, 0.5) == pytest.approx(1e-4)
    assert ulp(torch.bfloat16, 13.0) == 0.0625 and ulp(torch.float16, 13.0) == 2 ** -7
    # bf16: twice the contract's budget around a rounding floor, plus two units in the last place
    assert tolerance(torch.bfloat16, 13.0, floor=0.03) == pytest.approx(2 * (1.5 * 0.03 + 1e-3) + 0.125)
    ok = compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-5]), torch.float32)
    assert ok["passed"] and ok["max_abs_diff"] == pytest.approx(1e-5, rel=0.1)
    assert not compare(torch.tensor([float("nan")]), torch.tensor([1.0]), torch.float32)["passed"]


def test_attribution_run_records_its_self_check(default_model, tmp_path):
    model, proc = default_model
    ds = load_easy_vqa("test", limit=2, qtypes=("shape",))
    run_attribution(model, proc, ds, Settings(n_images=1, masks=16, compare=False, baseline="zero"), tmp_path)
    check = _run_json(tmp_path)["self_check"]
    assert check["identity"]["passed"] and check["identity"]["max_abs_diff"] == 0.0
    assert check["fast_vs_naive"]["passed"] and check["fast_vs_naive"]["max_abs_diff"] < 1e-4 * check["fast_vs_naive"]["scale"]
    assert check["fast"] and check["transformers"] == transformers.__version__ and check["family"] == "llava"


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_broken_fast_path_falls_back_to_the_naive_path(default_model, tmp_path, prefix_one_short):
    model, proc = default_model
    ds = load_easy_vqa("test", limit=2, qtypes=("shape",))
    s = Settings(n_images=2, masks=16, compare=False, baseline="zero")
    # a handler on headsteer's logger itself: the CLI stops its propagation to the root (pytest's caplog)
    log, lines = logging.getLogger("headsteer"), _Lines()
    log.addHandler(lines)
    try:
        rows = run_attribution(model, proc, ds, s, tmp_path / "broken")
    finally:
        log.removeHandler(lines)
    check = _run_json(tmp_path / "broken")["self_check"]
    assert not check["fast_vs_naive"]["passed"] and check["fast"] is False
    assert any("uses the naive path" in line and "\n" not in line for line in lines.lines)
    # the numbers are the naive path's, not the broken fast path's
    reference = run_attribution(model, proc, ds, s, tmp_path / "naive", check={"fast": False})
    for a, b in zip(rows, reference):
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)


def test_broken_cache_path_stops_generation_under_an_edit(default_model, tmp_path, decode_positions_off_by_one):
    model, proc = default_model
    ds = load_easy_vqa("test", limit=2, qtypes=("shape",))
    edit = EditManifest("attn", "L1H0-7,L2H0-7", {"alpha": 2.0})
    with pytest.raises(SelfCheckFailed, match=rf"cached generation .* on llava with transformers {transformers.__version__}"):
        evaluate(model, proc, ds, ("accuracy",), edit=edit, mode="open", out_dir=tmp_path / "open")
    assert not (tmp_path / "open").exists()  # stopped before the run folder was made
    closed = evaluate(model, proc, ds, ("accuracy",), edit=edit, mode="closed", out_dir=tmp_path / "closed")
    assert len(closed) == 2  # no generation, nothing to stop: identity is all it checks
    assert "generation" not in _run_json(tmp_path / "closed")["self_check"]


def test_cli_eval_open_stops_in_one_line_and_no_self_check_runs_anyway(tmp_path, decode_positions_off_by_one):
    edit = tmp_path / "amp.json"
    EditManifest("attn", "L1H0-7,L2H0-7", {"alpha": 2.0}).save(edit)
    args = ["eval", "--limit", "2", "--metrics", "accuracy", "--mode", "open", "--edit", str(edit)]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")])
    last = r.output.strip().splitlines()[-1]  # (after the progress bar's start)
    assert r.exit_code == 1 and last.startswith("Error: self-check failed") and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--no-self-check"])
    assert r.exit_code == 0, r.output
    assert _run_json(tmp_path / "b")["self_check"] == {"skipped": "--no-self-check"}


def test_generation_check_passes_on_a_sound_engine(default_model, tmp_path):
    model, proc = default_model
    ds = load_easy_vqa("test", limit=1, qtypes=("shape",))
    evaluate(model, proc, ds, ("accuracy",), edit=EditManifest("attn", "L1H0-7", {"alpha": 2.0}), mode="open", out_dir=tmp_path)
    gen = _run_json(tmp_path)["self_check"]["generation"]
    assert gen["passed"] and gen["tokens"] >= 1 and gen["max_abs_diff"] <= gen["tolerance"]


def test_untested_transformers_warns_in_one_line():
    assert untested_transformers(transformers.__version__) is None  # the suite runs inside the tested range
    msg = untested_transformers("99.0.0")
    assert msg is not None and "99.0.0" in msg and "\n" not in msg and "pip install 'transformers" in msg
