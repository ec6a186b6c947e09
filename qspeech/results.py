"""result.json: one file per run, written atomically; collecting them for the report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from qspeech.atomic import write_json_atomic  # noqa: F401  (results files are written atomically)

RESULT_FILE = "result.json"


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
        data["_mtime"] = path.stat().st_mtime  # the latest of several files of one kind wins
        results.append(data)
    return results, problems
