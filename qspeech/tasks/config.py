"""What every task's config has, and what a task module declares; each task's own config class (e.g.
qspeech.tasks.asr.ASRConfig) adds its settings and is the Hydra schema of its conf/task/*.yaml (`_schema_<kind>`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from qspeech.checks import need
from qspeech.tasks.metrics import Metric, register


@dataclass
class TaskConfig:
    name: str = ""  # names the run (result.json's task)
    kind: str = ""  # picks the task module (qspeech.tasks.TASKS)

    def __post_init__(self):
        need(bool(self.name), "name", self.name, "must be a non-empty name")


@dataclass(frozen=True)
class Task:
    """What a task module declares as its module-level TASK (found by qspeech.tasks). Declaring it declares its
    metrics: the report and sweeps learn their units and directions from here (qspeech.tasks.metrics)."""

    kind: str  # task.kind in the YAML
    config: type  # its TaskConfig subclass: the Hydra schema of its conf/task/*.yaml
    # downstream(cfg): the task's own part of a run (qspeech.tasks.downstream.Downstream: data, features, head)
    downstream: Callable
    metrics: tuple[Metric, ...]  # what it scores; the first selects the checkpoint and is result.json's `metric`
    # result.json's metrics.higher_is_better; ASR's files have never carried it (readers ask the Metric)
    states_direction: bool = True

    def __post_init__(self):
        need(len(self.metrics) > 0, "metrics", self.metrics, "must name at least one Metric")
        register(self.metrics)
