"""report.html in a real headless browser (Debian's chromium): the page loads with no console
message (script errors and Content-Security-Policy refusals are both console messages), draws the
grid, and its hover, rate and image controls show the run's numbers. Skipped where chromium is not
installed (CI does not install it)."""
import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from report_pages import EVIL, attribution_page, flow_page, shape_example

from headsteer.cli import main

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

CONSOLE = re.compile(r"CONSOLE[:(]")  # chromium's log line of a console message: "INFO:CONSOLE:12]" / "CONSOLE(12)"


def browse(page: Path, *args, timeout=90) -> tuple[str, list[str]]:
    """(stdout, console messages) of headless chromium on ``page``; ``args``: --dump-dom, --screenshot=..."""
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                            "--enable-logging=stderr", "--v=0", *args, page.resolve().as_uri()],
                           capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, [line for line in r.stderr.splitlines() if CONSOLE.search(line)]


def with_probe(text: str, probe: str) -> str:
    """The page without its Content-Security-Policy (which admits only the renderer's own script) and
    with ``probe``, a script run after the renderer that writes what it sees into body attributes."""
    text = re.sub(r"<meta http-equiv='Content-Security-Policy'[^>]*>", "", text)
    return text.replace("</body>", f"<script>{probe}</script></body>")


def attr(dom: str, name: str) -> str:
    m = re.search(rf'{name}="([^"]*)"', dom)
    assert m, f"no {name} in the DOM"
    return html.unescape(m.group(1))


PROBE = """
const tipText = () => document.querySelector(".tip").textContent;
function hover(el, fx = 0.5, fy = 0.5) {
  const r = el.getBoundingClientRect();
  el.dispatchEvent(new MouseEvent("mousemove", {bubbles: true, clientX: r.x + fx * r.width, clientY: r.y + fy * r.height}));
  return tipText();
}
const b = document.body;
try {
  b.setAttribute("data-tip-grid", hover(document.querySelector('[data-grid="aggregate"] .cell[data-head="HEAD"]')));
  b.setAttribute("data-tip-curve", hover(document.querySelector('[data-chart="faithfulness"] rect[fill="transparent"]'), 0.99));
  const sel = document.getElementById("image-select");
  sel.value = String(sel.options.length - 1);
  sel.dispatchEvent(new Event("change"));
  b.setAttribute("data-image-facts", document.querySelector("#image .facts").textContent);
  b.setAttribute("data-image-cells", String(document.querySelectorAll('[data-grid="image"] .cell').length));
  const rate = document.getElementById("rate");
  if (rate) {
    rate.value = "1";
    rate.dispatchEvent(new Event("change"));
    b.setAttribute("data-rate1-values", [...document.querySelectorAll('[data-grid="aggregate"] .cell')].map((c) => c.getAttribute("data-value")).join(","));
  }
} catch (err) { b.setAttribute("data-probe-error", String(err)); }
"""


def test_the_harness_sees_console_errors(tmp_path):
    """The no-console-message assertions below mean something: a script error and a blocked fetch
    in a page are seen."""
    p = tmp_path / "bad.html"
    p.write_text("<!doctype html><html><head><meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
                 "script-src 'unsafe-inline'\"></head><body><img src='https://example.invalid/x.png'>"
                 "<script>notDefined();</script></body></html>")
    _, console = browse(p, "--dump-dom")
    assert any("notDefined" in line for line in console) and any("Content Security Policy" in line for line in console), console


def test_attribute_report_in_a_browser(tmp_path):
    out = tmp_path / "att"
    r = CliRunner().invoke(main, ["attribute", "--n-images", "3", "--n-eval", "3", "--masks", "48", "--out", str(out)])
    assert r.exit_code == 0, r.output
    page = out / "report.html"
    assert any(line.startswith("wrote ") and "report.html" in line for line in r.output.splitlines())
    assert page.stat().st_size < 300_000
    dom, console = browse(page, "--dump-dom")
    assert not console, console
    assert 'data-rendered="yes"' in dom
    heads = json.loads((out / "heads.json").read_text())
    cells = re.findall(r'<rect [^>]*class="cell"[^>]*>', dom)
    assert len(cells) == 2 * 32  # the aggregate grid and the first image's own
    agg = re.search(r'data-grid="aggregate".*?</svg>', dom, re.S).group(0)
    values = {re.search(r'data-head="(\w+)"', c).group(1): float(re.search(r'data-value="([^"]*)"', c).group(1))
              for c in re.findall(r'<rect [^>]*class="cell"[^>]*>', agg)}
    for h in heads["heads"]:  # the grid shows heads.json's scores
        assert values[h["head"]] == pytest.approx(h["score"], rel=1e-3, abs=1e-6), h["head"]
    assert 'data-chart="faithfulness"' in dom and 'data-chart="completeness"' in dom
    assert len(re.findall(r"<option value=\"\d\">#", dom)) == 3 and 'src="data:image/' in dom
    # hover, the image selector
    top = heads["heads"][0]
    dom, console = browse(_write(tmp_path / "probe.html", with_probe(page.read_text(), PROBE.replace("HEAD", top["head"]))),
                          "--dump-dom")
    assert not console and 'data-probe-error="' not in dom, (console, dom[-500:])
    tip = attr(dom, "data-tip-grid")
    assert tip.startswith(f"{top['head']}: rank 1 of 32"), tip
    shown = re.search(r"score (\S+) ± (\S+) stderr.*single-head ablation drop: (\S+)attention to the image: (\S+)", tip)
    assert shown, tip
    for got, key in zip(shown.groups(), ("score", "stderr", "single", "attention")):
        assert float(got) == pytest.approx(top[key], abs=2e-3), (key, tip)
    curve = attr(dom, "data-tip-curve")
    assert curve.startswith("k = 32") and "attribution: 1.00" in curve
    rows = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    assert rows[-1]["question"] in attr(dom, "data-image-facts") and attr(dom, "data-image-cells") == "32"
    # the screenshot is a drawn page, not a blank one
    shot = tmp_path / "report.png"
    browse(page, f"--screenshot={shot}", "--window-size=1400,1000", "--hide-scrollbars")
    im = np.asarray(Image.open(shot).convert("RGB"))
    assert im.shape == (1000, 1400, 3) and len(np.unique(im.reshape(-1, 3), axis=0)) > 50


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_user_strings_and_rates_in_a_browser(tmp_path):
    """A question that is markup stays text (the page shows it, nothing runs); the rate selector
    switches the grid to that rate's scores; an image without a mask says so."""
    examples = [shape_example(), {"image": shape_example()["image"]}, shape_example(box=(5, 5, 20, 20))]
    text, data, agg, rows = attribution_page(examples=examples, n=3, questions=["plain?", "x", EVIL], L=2, H=3,
                                             rates=(0.1, 0.5))
    page = _write(tmp_path / "evil.html", text)
    dom, console = browse(page, "--dump-dom")
    assert not console, console
    assert 'data-rendered="yes"' in dom and 'data-pwned="' not in dom
    probe = PROBE.replace("HEAD", "L0H0")
    dom, console = browse(_write(tmp_path / "probe.html", with_probe(text, probe)), "--dump-dom")
    assert not console and 'data-probe-error="' not in dom, (console, dom[-500:])
    assert 'data-pwned="' not in dom  # neither the <script> nor the onerror in the question ran
    assert EVIL in attr(dom, "data-image-facts")  # the last image's question, shown as the text it is
    shown = [float(v) for v in attr(dom, "data-rate1-values").split(",")]
    np.testing.assert_allclose(shown, agg["rates"]["0.5"]["mean"].ravel(), rtol=1e-3, atol=1e-6)
    dom, _ = browse(_write(tmp_path / "second.html", with_probe(text, "const s = document.getElementById('image-select');"
                                                                       "s.value = '1'; s.dispatchEvent(new Event('change'));")),
                    "--dump-dom")
    assert "no object mask or box for this image" in dom


def test_flow_report_in_a_browser(tmp_path):
    dom, console = browse(_write(tmp_path / "flow.html", flow_page()), "--dump-dom")
    assert not console, console
    assert 'data-rendered="yes"' in dom and 'data-chart="flow"' in dom
    assert len(re.findall(r'<g class="series" data-series="[^"]+"', dom)) == 2 and "-50.0%" in dom


def test_a_no_compare_report_in_a_browser(tmp_path):
    """--no-compare: no single-head or attention numbers and no curves; the page says so and draws the rest."""
    text, *_ = attribution_page(examples=[shape_example()] * 2, n=2, rates=(0.1,), curves=False, single=False)
    dom, console = browse(_write(tmp_path / "nc.html", text), "--dump-dom")
    assert not console, console
    assert 'data-rendered="yes"' in dom and len(re.findall(r'class="cell"', dom)) == 2 * 6
    app = dom.split('id="app"')[1].split("<script")[0]  # what the renderer drew
    assert "not computed for this run (--no-compare)" in app and "single-head" not in app and "attention to" not in app
