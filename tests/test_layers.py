"""The layering of DESIGN.md ("Contracts"): the core imports no subpackage; attribution and edit
import only the core; eval may import edit; imports sit at the top of modules."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"headsteer": ROOT / "headsteer", "attribution": ROOT / "attribution", "edit": ROOT / "edit", "eval": ROOT / "eval"}
ALLOWED = {"headsteer": set(), "attribution": set(), "edit": set(), "eval": {"edit"}}
SUB = ("attribution", "edit", "eval")


def _modules():
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            yield pkg, path


def _imported(node, pkg):
    """Subpackage names an import statement refers to."""
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: inside the package itself, or the core's own subpackages
            base = "headsteer" if pkg == "headsteer" else f"headsteer.{pkg}"
            mod = node.module or ""
            names = [f"{base}.{mod}" if mod else base] + ([f"{base}.{a.name}" for a in node.names] if not mod and pkg == "headsteer" else [])
        else:
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
    out = set()
    for n in names:
        parts = n.split(".")
        if len(parts) >= 2 and parts[0] == "headsteer" and parts[1] in SUB:
            out.add(parts[1])
    return out


@pytest.mark.parametrize("pkg,path", list(_modules()), ids=lambda x: str(x)[-40:] if isinstance(x, Path) else x)
def test_imports_respect_the_layers(pkg, path):
    tree = ast.parse(path.read_text())
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            used |= _imported(node, pkg)
    bad = used - ALLOWED[pkg] - ({pkg} if pkg in SUB else set())
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_cli_table_names_each_command_where_it_is():
    """The CLI (the top layer) imports each command from its subpackage by this table: no entry points,
    no registry in between; every module and attribute it names exists."""
    import importlib

    from headsteer.cli import COMMANDS

    assert {"attribute", "flow", "edit", "export", "eval", "compare", "ask"} <= set(COMMANDS)
    for name, (module, attr, _) in COMMANDS.items():
        assert module.split(".")[1] in SUB and hasattr(importlib.import_module(module), attr), name


def test_no_model_type_outside_the_family_records():
    """A family is one record (headsteer/families.py): no model-type string appears anywhere else in
    the package's code (docs and tests aside)."""
    from headsteer.families import FAMILIES, REFUSED

    types = set(FAMILIES) | set(REFUSED)
    found = []
    for pkg, path in _modules():
        if path.name == "families.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in types:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not found, found
