"""The scripts in scripts/ that produce the README's figures: they run against this checkout's
code or refuse in one line, and the GPU check's own steps work (on the CPU, tiny shapes)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs a script as `python scripts/X.py` would, but with the import hook of the editable install
# removed: headsteer as if it were not installed from this checkout (a stale or foreign install).
WITHOUT_INSTALL = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                    and "editable" not in getattr(f, "__name__", "").lower()]
for name in [m for m in sys.modules if m == "headsteer" or m.startswith("headsteer.")]:
    del sys.modules[name]
sys.path[0] = {scripts!r}
sys.argv = [{script!r}, "--help"]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "scripts").glob("[!_]*.py")))
def test_script_without_this_checkout_installed_refuses_in_one_line(name, tmp_path):
    script = str(ROOT / "scripts" / name)
    code = WITHOUT_INSTALL.format(scripts=str(ROOT / "scripts"), script=script)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install -e" in lines[0] and str(ROOT) in lines[0], r.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "scripts").glob("[!_]*.py")))
def test_script_runs_against_this_checkout(name, tmp_path):
    """Every script imports what it uses from this checkout (a renamed function breaks it here, not on
    the day its figures are needed) and answers --help."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / name), "--help"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage" in r.stdout.lower()


def test_gpu_check_steps_run_on_the_cpu(tmp_path):
    """The GPU check gets a few minutes of a lent GPU: a step that fails there for a reason a CPU run
    would show (an import, an argument, a device mix-up) wastes it. Tiny shapes, fp32, the steps
    that the rest of the suite does not already cover."""
    skip = "19-token,tests:,default:,steer,compare"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--work", str(tmp_path), "--device", "cpu",
                        "--small", "--dtype", "fp32", "--skip-qwen", "--n-images", "2", "--masks", "128", "--skip", skip],
                       capture_output=True, text=True, timeout=600)
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = [(s["step"], s["error"]) for s in summary["steps"] if s["ok"] is False]
    assert r.returncode == 0 and not failed, (failed, r.stdout[-3000:], r.stderr[-2000:])
    ran = {s["step"] for s in summary["steps"] if s["ok"]}
    for must in ("make llava-1.5-7b", "bench: llava-1.5-7b shape", "bench: scorers, llava-1.5-7b shape",
                 "llava7b: attribute 2 img x 128 masks", "llava7b: attribute --scorer atp*",
                 "precision contract at llava-1.5-7b", "llava7b: eval (accuracy + transfer)", "llava7b: export (scale, baked)"):
        assert must in ran, (must, sorted(ran))
    assert summary["projections"][0]["model"] == "llava7b"
