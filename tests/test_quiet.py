"""-q silences every progress bar of the commands (an explicit tqdm ``disable=`` overrides TQDM_DISABLE)."""
import os

import pytest
from click.testing import CliRunner

from headsteer.cli import main

BAR_MARKS = ("it/s", "ex/s", "img/s", "step/s", "%|")


@pytest.fixture
def no_tqdm_env():
    old = os.environ.pop("TQDM_DISABLE", None)
    yield
    os.environ.pop("TQDM_DISABLE", None)
    if old is not None:
        os.environ["TQDM_DISABLE"] = old


def test_quiet_eval_prints_no_progress_bar(tmp_path, no_tqdm_env):
    r = CliRunner().invoke(main, ["-q", "eval", "--limit", "2", "--metrics", "accuracy", "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output  # the figures still print
    assert not [m for m in BAR_MARKS if m in r.output], r.output
    assert "TQDM_DISABLE" not in os.environ  # -q of one in-process call does not silence the next


def test_eval_shows_its_bar_without_quiet(tmp_path, no_tqdm_env):
    # the check above means something only if the bar shows otherwise
    r = CliRunner().invoke(main, ["eval", "--limit", "2", "--metrics", "accuracy", "--out", str(tmp_path / "v")])
    assert r.exit_code == 0, r.output
    assert "ex/s" in r.output or "ex]" in r.output, r.output
