"""What tasks score and report: the metrics a task declares (name, unit, direction), word and character
error rates (jiwer) in percent over a corpus (not averaged per utterance), and the record a task returns."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping

import jiwer

from qspeech.records import Record, optional


@dataclass(frozen=True)
class Metric:
    """A score a task reports, as its Task declares it (qspeech.tasks.config.Task registers it here)."""

    name: str  # the key in result.json (`metric`, dev_<name>)
    higher_is_better: bool  # the report and sweeps compare with it
    unit: str = "%"


# name -> Metric, filled by every Task when it is declared (a task module is found by qspeech.tasks)
METRICS: dict[str, Metric] = {}


def register(metrics) -> None:
    """Declares `metrics` (Metric); a name declared twice must mean the same thing."""
    for m in metrics:
        if METRICS.setdefault(m.name, m) != m:
            raise ValueError(f"metric {m.name!r} declared twice differently: {METRICS[m.name]} and {m}")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` is better, as the task that reports it declares (unknown: False)."""
    m = METRICS.get(metric)
    return m.higher_is_better if m is not None else False


def metric_unit(metric: str) -> str:
    """The unit `metric`'s values are written in, as the task that reports it declares (unknown: %)."""
    m = METRICS.get(metric)
    return m.unit if m is not None else "%"


def _pairs(refs: list[str], hyps: list[str]) -> tuple[list[str], list[str]]:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    # jiwer refuses empty references; an utterance without words has nothing to score.
    keep = [i for i, r in enumerate(refs) if r.strip()]
    return [refs[i] for i in keep], [hyps[i] for i in keep]


def wer(refs: list[str], hyps: list[str]) -> float:
    refs, hyps = _pairs(refs, hyps)
    return 100.0 * jiwer.wer(refs, hyps) if refs else float("nan")


def cer(refs: list[str], hyps: list[str]) -> float:
    refs, hyps = _pairs(refs, hyps)
    return 100.0 * jiwer.cer(refs, hyps) if refs else float("nan")


@dataclass(kw_only=True)
class TaskMetrics(Record):
    """What a downstream task reports (result.json's `metrics`): the test metric, the dev scores that chose
    the checkpoint, and how training went. Task-specific scores (ASR's dev_wer, cer, dev_cer) are left out of
    the file by tasks that do not have them; the scores of a metric without a field here (a new task's) are in
    `scores` and written flat beside the others (dev_<name>, <name>)."""

    metric: str  # name of `value`, a Metric its task declares (wer, per: lower is better; acc: higher)
    value: float  # the test score, in the metric's unit
    higher_is_better: bool | None = optional()  # the metric's direction; not written by ASR (Task.states_direction)
    dev_wer: float | None = optional()
    dev_per: float | None = optional()
    dev_acc: float | None = optional()
    cer: float | None = optional()
    dev_cer: float | None = optional()
    steps: int | None = None
    best_step: int | None = None
    train_wall_s: float | None = None
    upstream_utts_per_s: float | None = None  # None: no upstream pass was timed
    train_utts_per_s: float | None = None
    layer_weights: list[float] | None = None  # the featurizer's softmax weights, one per hidden state
    n_train: int | None = None  # utterances used (unreadable audio skipped)
    n_dev: int | None = None
    n_test: int | None = None
    skipped_audio: int | None = None
    # the head scored on a second data set (`eval_data=...`): {data, split, n, wer, cer}
    eval: dict | None = optional()
    feature_cache: str | None = None  # hit | miss | off
    resumed_from_step: int | None = None
    device: str | None = None
    head_params: int | None = None
    n_classes: list[int] | None = optional()  # classification: classes per slot (IC: action, object, location)
    majority_acc: float | None = optional()  # classification: test accuracy of always answering train's majority
    scores: dict[str, float] | None = optional()  # dev_<name> and <name> of metrics without a field above

    @classmethod
    def of_scores(cls, metrics, test: Mapping, dev: Mapping, states_direction: bool = True, **fields) -> "TaskMetrics":
        """The record of a task declaring `metrics` (the first one selects and is `value`) from its test and
        best dev scores: dev_<first>, then <name> and dev_<name> of the others; higher_is_better where
        states_direction."""
        first, *rest = metrics
        named = {f"dev_{first.name}": dev.get(first.name, math.nan)}
        for m in rest:
            named |= {m.name: test[m.name], f"dev_{m.name}": dev.get(m.name, math.nan)}
        own = {f.name for f in dataclasses.fields(cls)}
        scores = {k: float(v) for k, v in named.items() if k not in own}
        return cls(metric=first.name, value=float(test[first.name]),
                   higher_is_better=first.higher_is_better if states_direction else None,
                   **{k: float(v) for k, v in named.items() if k in own}, scores=scores or None, **fields)

    def to_dict(self) -> dict:
        out = super().to_dict()
        return {k: v for k, v in out.items() if k != "scores"} | (out.get("scores") or {})

    @classmethod
    def from_dict(cls, data: Mapping) -> "TaskMetrics":
        m = super().from_dict(data)
        own = {f.name for f in dataclasses.fields(cls)}
        extra = {k: float(v) for k, v in data.items() if k not in own and k.removeprefix("dev_") in METRICS
                 and isinstance(v, (int, float)) and not isinstance(v, bool)}
        return dataclasses.replace(m, scores=extra) if extra else m

    def __getattr__(self, name: str):
        """dev_<name> and <name> of a metric without a field of its own (see `scores`)."""
        scores = self.__dict__.get("scores") or {}
        if name in scores:
            return scores[name]
        raise AttributeError(name)

    @property
    def dev_value(self) -> float | None:
        """The dev score of `metric` (the one that selected the checkpoint), if the task reports it."""
        return getattr(self, f"dev_{self.metric}", None)
