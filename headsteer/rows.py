"""Per-item result rows in JSON lines: appended as items finish, so an interrupted run resumes."""
from __future__ import annotations

import json
from pathlib import Path

from .files import write_text
from .paths import read_text


def resume_rows(path: Path, key: str = "index") -> dict:
    """Rows already in ``path`` by ``key``. A torn last line (a run killed mid-write) is dropped
    and the file rewritten without it, so later appends stay line-aligned."""
    rows = {}
    if not path.exists():
        return rows
    for line in read_text(path, "results file").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            break
        rows[r[key]] = r
    write_text(path, "".join(json.dumps(rows[k]) + "\n" for k in sorted(rows)))
    return rows
