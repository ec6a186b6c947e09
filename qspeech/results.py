"""result.json: one file per run, written atomically; collecting them for the report."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write to a temp file in the same folder, fsync, rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def git_commit() -> str | None:
    """The commit of the qspeech checkout (with -dirty when it has local changes), or None."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


COST_FILE = "cost.json"


def collect(root: str | Path, name: str = RESULT_FILE,
            required: frozenset = frozenset({"model", "bits", "task", "status"})) -> tuple[list[dict], list[str]]:
    """Every `name` file under root: (results, problems). Unreadable files are reported, not fatal."""
    results, problems = [], []
    for path in sorted(Path(root).rglob(name)):
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not required <= data.keys():
                raise ValueError(f"missing {'/'.join(sorted(required))}")
        except (OSError, ValueError) as e:
            problems.append(f"{path}: unreadable result ({str(e).splitlines()[0][:100]}); skipped")
            continue
        data["run_dir"] = str(path.parent)
        results.append(data)
    return results, problems
