"""The README's and the docs' examples run as written: their ```python blocks execute (in a temporary
folder), every `headsteer ...` line of their ```bash blocks names options that exist, the README's
Commands table lists every file each command writes, the public functions' docstring examples run,
and the README stays short (the rest lives in docs/)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from headsteer.cli import main

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}


def blocks(lang, text=None):
    texts = [README, *DOCS.values()] if text is None else [text]
    return [b for t in texts for b in re.findall(rf"```{lang}\n(.*?)```", t, flags=re.S)]


def test_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = blocks("python")
    assert code
    for src in code:
        exec(compile(src, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "ckpt-scale0" / "headsteer_edit.json").exists()


def test_readme_is_short_and_links_the_docs():
    assert len(README.splitlines()) <= 150
    for name in ("design.md", "families.md", "benchmarks.md", "results.md", "contributing.md"):
        assert name in DOCS and f"docs/{name}" in README, name


@pytest.mark.parametrize("target", ["headsteer.loading.load", "headsteer.intervention.intervene", "headsteer.heads.HeadSet",
                                    "headsteer.attribution.engine.ablated_logits", "headsteer.attribution.engine",
                                    "headsteer.attribution.gradient.gradient_scores",
                                    "headsteer.edit.apply.apply_edit", "headsteer.edit.checkpoint.export"])
def test_public_docstring_examples_run(target, tmp_path, monkeypatch):
    """Each public function's docstring carries a short example that runs (doctest)."""
    import doctest
    import importlib

    monkeypatch.chdir(tmp_path)
    module, _, name = target.rpartition(".")
    try:
        mod = importlib.import_module(module)
        obj = getattr(mod, name)
    except (ImportError, AttributeError):
        mod = obj = importlib.import_module(target)
    # as `python -m doctest` runs them: in the namespace of the module that defines the name
    examples = doctest.DocTestFinder(recurse=False).find(obj, name, module=mod, globs=dict(vars(mod)))
    assert examples and examples[0].examples, f"{target} has no example in its docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in examples:
        runner.run(t)
    assert runner.failures == 0, target


def _command_lines():
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0]
            m = re.search(r"(?:^|&&\s*|-m\s+)headsteer\s+(.*)$", line)
            if m:
                yield m.group(1).strip()


@pytest.mark.parametrize("line", list(_command_lines()))
def test_bash_lines_parse(line):
    words = shlex.split(line)
    ctx = click.Context(main)
    cmd = main.get_command(ctx, words[0])
    assert cmd is not None, line
    rest = words[1:]
    if isinstance(cmd, click.Group):
        cmd, rest = cmd.get_command(ctx, rest[0]), rest[1:]
        assert cmd is not None, line
    known = {o for p in cmd.params for o in getattr(p, "opts", [])}
    for w in rest:
        if w.startswith("--"):
            assert w.split("=")[0] in known, f"{w} is not an option of `{line}`"
    cmd.make_context(cmd.name, list(rest), resilient_parsing=False)  # values parse too (types, choices)


def _table_row(name):
    row = next(line for line in README.splitlines() if line.startswith(f"| `headsteer {name}"))
    return row.rsplit("|", 2)[1]


def test_commands_table_lists_every_output():
    from headsteer.attribution.flow_cli import FLOW_OUTPUTS
    from headsteer.attribution.run import OUTPUTS as ATTRIBUTE
    from headsteer.eval.comparison import OUTPUTS as COMPARE
    from headsteer.eval.run import OUTPUTS as EVAL
    from headsteer.rundir import LOG_FILE, RUN_FILE

    for name, outs in (("attribute", ATTRIBUTE), ("flow", FLOW_OUTPUTS), ("eval", EVAL), ("compare", COMPARE)):
        row = _table_row(name)
        missing = [o for o in (*outs, RUN_FILE, LOG_FILE) if o not in row]
        assert not missing, f"README's Commands table misses {missing} for {name}"
    assert "headsteer_edit.json" in _table_row("export")
    from headsteer.eval.lmms_task import export_outputs

    row = _table_row("export-task")
    missing = [o for o in (*export_outputs(), RUN_FILE, LOG_FILE) if o not in row]
    assert not missing, f"README's Commands table misses {missing} for export-task"
