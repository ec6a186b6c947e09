"""result.json: one typed record per run, written atomically; collecting them for the report."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qspeech.atomic import LOCK_FILE, lock_holder, write_json_atomic  # noqa: F401  (results files are written atomically)
from qspeech.cost import CostReport
from qspeech.preemption import Preempted
from qspeech.records import Record, optional, transient
from qspeech.tasks.metrics import TaskMetrics

RESULT_FILE = "result.json"
FAILURE_FILE = "result.last_failure.json"  # a failed rerun's record, beside an earlier successful one


@dataclass(kw_only=True)
class RunResult(Record):
    """result.json. The fields of stages that did not run (accounting, task, export) and `error` are left
    out of the file; the others are always written. Field order is the file's key order."""

    model: str
    init: str = "pretrained"
    quant: str | None = None
    targets: list[str] | None = None
    bits: int
    task: str
    data: str = ""
    status: str  # running | ok | failed | preempted (stopped by a signal with its state saved: rerun to resume)
    git_commit: str | None = None  # the qspeech checkout's commit, -dirty with local changes
    started: str | None = None  # ISO 8601, UTC
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config
    # accounting (see qspeech.cost)
    params: int | None = optional()
    quantized_params: int | None = optional()
    macs: int | None = optional()
    storage_mb: float | None = optional()
    est_runtime: float | None = optional()
    # the downstream task
    metric: str | None = optional()
    value: float | None = optional()
    metrics: TaskMetrics | None = optional()
    # export=true
    packed_path: str | None = optional()
    packed_mb: float | None = optional()
    error: str | None = optional()
    finished: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, rounded to ms
    run_dir: str | None = transient()  # where the reader found the file

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def add_cost(self, cost: CostReport) -> None:
        self.params, self.quantized_params, self.macs = cost.params, cost.quantized_params, cost.macs
        self.storage_mb, self.est_runtime = round(cost.storage_mb, 4), round(cost.est_runtime, 4)

    def add_metrics(self, metrics: TaskMetrics) -> None:
        self.metric, self.value, self.metrics = metrics.metric, metrics.value, metrics

    def add_packed(self, path: Path) -> None:
        self.packed_path, self.packed_mb = str(path), round(Path(path).stat().st_size / 1e6, 4)

    def fail(self, error: str) -> None:
        self.status, self.error = "failed", error

    def interrupted(self, e: BaseException) -> None:
        """The run stopped on `e` before finishing: preempted (qspeech.preemption: its state is saved, the
        requeued job or a rerun resumes it) or failed."""
        if isinstance(e, Preempted):
            self.status, self.error = "preempted", str(e)
        else:
            self.fail(f"{type(e).__name__}: {e}")

    def finish(self, finished: str, timings: dict[str, float]) -> None:
        self.finished, self.timings = finished, {k: round(v, 3) for k, v in timings.items()}


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
    """Every `name` file under root as a dict with `run_dir` and `_mtime` (the latest of several files of one
    kind wins): (dicts, problems). Unreadable files are reported, not fatal."""

    def check(data) -> dict:
        if not isinstance(data, dict) or not required <= data.keys():
            raise ValueError(f"missing {'/'.join(sorted(required))}")
        return data

    found, problems = _read_all(root, name, check)
    return [d | {"run_dir": str(path.parent), "_mtime": path.stat().st_mtime} for path, d in found], problems


def load_results(root: str | Path) -> tuple[list[RunResult], list[str]]:
    """Every result.json under root as a RunResult: (results, problems). Unreadable or incomplete files are
    reported, not fatal."""
    found, problems = _read_all(root, RESULT_FILE, RunResult.from_dict)
    for path, result in found:
        result.run_dir = str(path.parent)
    return [r for _, r in found], problems


def runs_without_result(root: str | Path) -> list[tuple[str, str, str]]:
    """Run folders under root that have no result.json yet: (folder, 'running' | 'stopped', holder) for a run
    in progress (its lock names a live process) or one killed before it wrote its result (a dead holder)."""
    out = []
    for lock in sorted(Path(root).rglob(LOCK_FILE)):
        folder = lock.parent
        if (folder / RESULT_FILE).exists():
            continue
        holder = lock_holder(folder)
        if holder is not None:
            out.append((str(folder), "running" if holder[0] else "stopped", holder[1]))
    return out


def _read_all(root: str | Path, name: str, parse: Callable[[Any], Any]) -> tuple[list[tuple[Path, Any]], list[str]]:
    found, problems = [], []
    for path in sorted(Path(root).rglob(name)):
        try:
            found.append((path, parse(json.loads(path.read_text()))))
        except (OSError, ValueError) as e:
            problems.append(f"{path}: unreadable result ({str(e).splitlines()[0][:100]}); skipped")
    return found, problems
