"""One downstream run, whatever the task: device, the frozen upstream placed there and put back, the seed, the
head's resume key, training (qspeech.train.fit), the test evaluation, the predictions file, the saved head
(downstream.pt) and the task's record (TaskMetrics). A task brings only its own part (`Downstream`): its data,
its features, its head and how it scores.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from qspeech.atomic import torch_save_atomic, write_text_atomic
from qspeech.errors import TrainingError
from qspeech.features import SplitStats, summary
from qspeech.identity import identity_dict, stable_hash
from qspeech.seeding import seed_everything
from qspeech.tasks.config import Task
from qspeech.tasks.metrics import TaskMetrics
from qspeech.train import Trainable, autocast_ctx, fit, resolve_device, torch_threads

SPLITS = ("train", "dev", "test")


@dataclass
class Splits:
    """A task's utterances: train, dev and test (and `eval`, a second test set scored after training that
    never selects anything), each with the fingerprint of its content (feature cache and resume keys)."""

    utts: dict[str, list]
    fingerprints: dict[str, str]
    eval_name: str | None = None  # the eval split's data set (eval_<name>_predictions.tsv)


class Head(Trainable, Protocol):
    """What run_downstream needs of a task's trainable beyond qspeech.train.fit's."""

    test_autocast: bool  # evaluate test under train.amp's autocast (as fit evaluates dev)

    def predictions_tsv(self, split: str) -> str: ...  # the last evaluation of `split`, as a TSV file

    def saved(self) -> dict: ...  # what downstream.pt holds besides the weights (vocab, phones, classes)

    def feature_stats(self) -> dict[str, SplitStats]: ...

    def extra_metrics(self) -> dict: ...  # TaskMetrics fields of this task alone (n_classes, majority_acc)


class Downstream(Protocol):
    """A task's own part of a run (its TASK.downstream(cfg) makes one)."""

    head_key: dict  # inputs of the head's resume key besides the run's (see run_key)

    def load(self, progress: bool) -> Splits: ...

    def features(self, upstream, upstream_key: str, data: Splits, device, progress: bool): ...

    def head(self, upstream, data: Splits, features) -> Head: ...  # built after seeding


def run_key(cfg, upstream_key: str, fingerprints: dict, head_key: dict) -> str:
    """The trained head's resume key: the upstream, the task and train settings, the train/dev/test content,
    the seed (and the task's head_key); an eval split never changes it."""
    return stable_hash({"upstream": upstream_key, "task": identity_dict(cfg.task), "train": cfg.train.resume_identity(),
                        "data": {s: fingerprints[s] for s in SPLITS}, "seed": cfg.seed, **head_key}, 20)


@contextlib.contextmanager
def upstream_on(upstream, device):
    """The frozen upstream in eval mode on `device` inside the block, back where it was after."""
    orig = next(iter(upstream.parameters()), torch.empty(0)).device  # FBANK has no parameters
    upstream.eval().requires_grad_(False).to(device)
    try:
        yield
    finally:
        upstream.to(orig)


def run_downstream(cfg, upstream, run_dir: Path, upstream_key: str, task: Task, progress: bool = True,
                   on_step: Callable[[int], None] | None = None) -> TaskMetrics:
    """Train `task`'s head on the frozen upstream, select on its first metric's dev
    score, evaluate test; writes test_predictions.tsv and downstream.pt into run_dir. cfg: the typed run
    config (its task, train, data, seed and cache_dir; see qspeech.tasks.run_task)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    part = task.downstream(cfg)
    with torch_threads(cfg.train.num_threads):
        data = part.load(progress)
        device = resolve_device(cfg.train)
        with upstream_on(upstream, device):
            features = part.features(upstream, upstream_key, data, device, progress)
            seed_everything(int(cfg.seed))
            head = part.head(upstream, data, features)
            res, scores = _fit_and_test(cfg, head, run_key(cfg, upstream_key, data.fingerprints, part.head_key),
                                        data, device, run_dir, progress, on_step)
    first = task.metrics[0].name
    if not np.isfinite(scores["test"][first]):
        raise TrainingError(f"test {first} is not finite: the test split has nothing to score")
    _save(run_dir, cfg.task, head, data, scores, res)
    return _metrics(task, head, data, scores, res, device)


def _fit_and_test(cfg, head: Head, key: str, data: Splits, device, run_dir: Path, progress: bool, on_step):
    trcfg = cfg.train
    state_dir = Path(trcfg.ckpt_dir) if trcfg.ckpt_dir else Path(str(cfg.cache_dir)) / "runs" / key
    res = fit(head, trcfg, seed=int(cfg.seed), state_dir=state_dir, run_dir=run_dir, progress=progress,
              on_step=on_step, desc=f"{cfg.task.kind} {cfg.task.name}")
    amp = autocast_ctx(trcfg, device) if head.test_autocast else contextlib.nullcontext()
    with torch.no_grad(), amp:
        scores = {s: head.evaluate(s, device) for s in ("test", "eval") if s in data.utts}
    return res, scores


def _save(run_dir: Path, tcfg, head: Head, data: Splits, scores: dict, res) -> None:
    files = {"test": "test_predictions.tsv", "eval": f"eval_{data.eval_name}_predictions.tsv"}
    for split in scores:
        write_text_atomic(run_dir / files[split], head.predictions_tsv(split))
    torch_save_atomic({"model": head.model.state_dict(), **head.saved(), "task": dataclasses.asdict(tcfg),
                       "best_step": res.best_step}, run_dir / "downstream.pt")


def _metrics(task: Task, head: Head, data: Splits, scores: dict, res, device) -> TaskMetrics:
    stats = head.feature_stats()
    m = TaskMetrics.of_scores(
        task.metrics, scores["test"], res.best, states_direction=task.states_direction,
        steps=res.steps, best_step=res.best_step, train_wall_s=round(res.train_wall_s, 3),
        train_utts_per_s=round(res.train_items_per_s, 3),
        layer_weights=[round(w, 6) for w in head.model.featurizer.layer_weights()],
        resumed_from_step=res.resumed_from, device=str(device),
        head_params=sum(p.numel() for p in head.model.parameters()), **summary(stats), **head.extra_metrics())
    if "eval" in scores:
        m.eval = {"data": data.eval_name, "split": "test", "n": stats["eval"].listed,
                  **{x.name: round(float(scores["eval"][x.name]), 4) for x in task.metrics}}
    return m
