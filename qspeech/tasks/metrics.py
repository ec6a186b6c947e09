"""Word and character error rates (jiwer), in percent, over a corpus (not averaged per utterance), and the
record a task returns."""

from __future__ import annotations

from dataclasses import dataclass

import jiwer

from qspeech.records import Record, optional


# Whether a larger value of a metric is better (report and sweeps compare with it); error rates are not.
HIGHER_IS_BETTER = {"wer": False, "cer": False, "per": False, "acc": True}


def higher_is_better(metric: str) -> bool:
    return HIGHER_IS_BETTER.get(metric, False)


def metric_unit(metric: str) -> str:
    """The unit a metric's values are written in (every built-in metric is a percentage)."""
    return "%"


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
    the file by tasks that do not have them."""

    metric: str  # name of `value`: wer, per (lower is better) or acc (higher is better); see HIGHER_IS_BETTER
    value: float  # the test score, in percent
    higher_is_better: bool | None = optional()  # written by tasks whose metric is not an error rate
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

    @property
    def dev_value(self) -> float | None:
        """The dev score of `metric` (the one that selected the checkpoint), if the task reports it."""
        return getattr(self, f"dev_{self.metric}", None)
