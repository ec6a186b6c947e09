"""What every task's config has; each task's own class (e.g. qspeech.tasks.asr.ASRConfig) adds its settings
and is the Hydra schema of its conf/task/*.yaml (`_schema_<kind>`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

from qspeech.checks import need


@dataclass
class TaskConfig:
    name: str = ""  # names the run (result.json's task)
    kind: str = ""  # picks the task module (qspeech.tasks.TASKS)

    def __post_init__(self):
        need(bool(self.name), "name", self.name, "must be a non-empty name")


class Task(NamedTuple):
    """What a task module declares as its module-level TASK (found by qspeech.tasks)."""

    kind: str  # task.kind in the YAML
    config: type  # its TaskConfig subclass: the Hydra schema of its conf/task/*.yaml
    run: Callable  # run(cfg, upstream, run_dir, upstream_key, progress=, on_step=) -> TaskMetrics
