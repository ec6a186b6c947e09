"""Training a downstream task on the one loop (qspeech.loop): length-bucketed batches, periodic evaluation
keeping the best model, atomic checkpoints that a killed run resumes from (reaching the same result on CPU).

The loop only sees a `Trainable` (see below): it knows nothing about speech or CTC.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from qspeech import distributed
from qspeech.atomic import torch_save_atomic
from qspeech.checks import choice, integer, need, number
from qspeech.errors import ConfigError, TrainingError
from qspeech.loggers.csv_file import write_csv
from qspeech.loop import STATE_VERSION, Job, LoopConfig, Step, linear_warmup_decay, read_checkpoint, run
from qspeech.identity import OUTSIDE, RUNTIME, SCHEDULE, identity_dict, runtime, schedule


@dataclass
class TrainConfig:
    """The `train` config group; the defaults are conf/train/cpu.yaml (the default option)."""

    name: str = "cpu"
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 autocast on CUDA, none on CPU) | bf16 | off
    max_steps: int = schedule(1500)
    batch_size: int = 16
    # Batches whose longest utterance is longer than this (seconds) are split in two (s3prl's
    # HALF_BATCHSIZE_TIME). null: never.
    half_batch_above_s: float | None = None
    # Length bucketing: each epoch is shuffled, cut into windows of this many batches, sorted by length
    # within a window, batched, and the batch order shuffled again.
    bucket_window: int = 50
    eval_every: int = schedule(300)
    save_every: int | None = runtime(None)  # checkpoint interval in steps; null: eval_every
    log_every: int = runtime(25)
    grad_clip: float | None = 1.0  # max global grad norm; 0 or null: no clipping
    # Learning-rate schedule over max_steps: constant (s3prl's SUPERB ASR) | linear (decay to 0: a short
    # run ends annealed instead of at its noisiest); warmup_steps of linear warmup first.
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    resume: bool = runtime(True)
    # Where the resumable training state lives; null: <cache_dir>/runs/<hash of everything that
    # determines the result>, so re-running a killed command resumes it whatever its output folder.
    ckpt_dir: str | None = runtime(None)
    # Upstream feature cache: auto (on when the estimated size fits cache_max_gb) | true | false.
    cache_features: Any = runtime("auto")
    cache_max_gb: float = runtime(20.0)
    feature_batch_s: float = runtime(60.0)  # seconds of (padded) audio per upstream forward when extracting
    eval_batch_size: int = runtime(32)
    # DataLoader worker processes that read, decode and pad training batches ahead of the step (pinned memory on
    # CUDA); 0: in the training process. Results are the same either way.
    num_workers: int = runtime(0)
    # The upstream's features in every split: fp32, or bf16 (autocast on the upstream alone; cached apart).
    feature_precision: str = "fp32"
    num_threads: int | None = runtime(None)  # torch CPU threads; null: torch's default

    def __post_init__(self):
        need(self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:"), "device", self.device,
             "choose auto, cpu, cuda or cuda:N")
        choice(self, "amp", ("auto", "bf16", "off"))
        choice(self, "lr_schedule", ("constant", "linear"))
        for k in ("max_steps", "batch_size", "bucket_window", "eval_every", "log_every", "eval_batch_size"):
            integer(self, k, 1)
        integer(self, "warmup_steps", 0, self.max_steps - 1)
        integer(self, "save_every", 1, optional=True)
        number(self, "half_batch_above_s", 0, lo_open=True, optional=True)
        number(self, "grad_clip", 0, optional=True)
        choice(self, "cache_features", ("auto", True, False))
        number(self, "cache_max_gb", 0)
        number(self, "feature_batch_s", 0, lo_open=True)
        choice(self, "resume", (True, False))
        integer(self, "num_threads", 1, optional=True)
        integer(self, "num_workers", 0)
        choice(self, "feature_precision", ("fp32", "bf16"))

    def resume_identity(self) -> dict:
        """What a head's resumable training state depends on (its resume key): the result fields but the
        schedule ones, so that changing eval_every, or raising max_steps under a constant learning rate,
        continues the training; a decaying rate reaches 0 at max_steps, so there max_steps stays in."""
        key = identity_dict(self, drop=(SCHEDULE, RUNTIME, OUTSIDE))
        if self.lr_schedule != "constant":
            key["max_steps"] = self.max_steps
        return key


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the task's learning rate for the update that takes `step` to `step + 1`."""
    return linear_warmup_decay(1.0, step, cfg.max_steps, cfg.warmup_steps, decay=cfg.lr_schedule == "linear")


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's CPU thread count set to n (None: unchanged) inside the block, restored after."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------------
class Trainable(Protocol):
    """What the loop needs from a task."""

    model: nn.Module
    select_metric: str  # key of evaluate()'s dict used to keep the best model (lower is better)

    def train_lengths(self) -> Sequence[float]:
        """Length (any unit, e.g. seconds) of each training item, for bucketing."""

    def make_batch(self, indices: list[int], device: torch.device) -> Any:
        """The batch for these training items (None: nothing usable, the loop skips it)."""

    def loss(self, batch: Any) -> tuple[torch.Tensor, int]:
        """Scalar loss to minimise and the number of items in the batch (model is in train mode)."""

    def evaluate(self, split: str, device: torch.device) -> dict[str, float]:
        """Metrics on a held-out split (model is in eval mode, no grad)."""

    def make_optimizer(self) -> torch.optim.Optimizer: ...


@dataclass
class FitResult:
    steps: int
    best_step: int
    best: dict[str, float]  # evaluate('dev') at best_step
    train_wall_s: float  # wall time of the training loop, evaluations included, summed over resumes
    train_step_s: float  # time inside training steps only (batch making + forward/backward/update)
    train_items: int  # items seen in training steps
    resumed_from: int  # step the run resumed from (0: fresh)
    history: list[dict] = field(default_factory=list)

    @property
    def train_items_per_s(self) -> float:
        return self.train_items / self.train_step_s if self.train_step_s > 0 else float("nan")


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The device of train.device; under torchrun a rank's CUDA device is its own (qspeech.distributed)."""
    if cfg.device == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={cfg.device}: no CUDA device is available; use train.device=auto or cpu")
    return distributed.local_device(torch.device(cfg.device))


def autocast_ctx(cfg: TrainConfig, device: torch.device):
    use = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def epoch_batches(lengths: Sequence[float], cfg: TrainConfig, seed: int, epoch: int) -> list[list[int]]:
    """Length-bucketed batches of one epoch; a pure function of (lengths, cfg, seed, epoch)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, epoch, 0xB0C4])
    perm = rng.permutation(len(lengths))
    window = cfg.batch_size * cfg.bucket_window
    batches: list[list[int]] = []
    for start in range(0, len(perm), window):
        chunk = perm[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        for b in range(0, len(chunk), cfg.batch_size):
            batch = [int(i) for i in chunk[b:b + cfg.batch_size]]
            if (cfg.half_batch_above_s is not None and len(batch) >= 2
                    and max(lengths[batch]) > cfg.half_batch_above_s):
                half = len(batch) // 2
                batches += [batch[:half], batch[half:]]
            else:
                batches.append(batch)
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


METRICS_FIELDS = ["step", "split", "metric", "value"]  # metrics.csv: one row per logged value


class _TrainBatches(torch.utils.data.Dataset):
    """A task's training batches by index list (the DataLoader's sampler yields whole batches)."""

    def __init__(self, task):
        self.task = task

    def __getitem__(self, indices):
        return self.task.load_batch(indices, "train") if indices else None


class _BatchStream:
    """Every training batch from (epoch, position) on, epoch after epoch (this rank's shard of each): the
    sampler of one DataLoader for the whole run, so its workers start once."""

    def __init__(self, lengths, cfg: TrainConfig, seed: int, epoch: int, pos: int):
        self.lengths, self.cfg, self.seed, self.epoch, self.pos = lengths, cfg, seed, epoch, pos

    def __iter__(self):
        epoch, pos = self.epoch, self.pos
        while True:
            batches = epoch_batches(self.lengths, self.cfg, self.seed, epoch)
            yield from (distributed.shard(b) for b in batches[pos:])
            epoch, pos = epoch + 1, 0


def batch_loader(task, batches, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    """The CPU halves of `batches` (task.load_batch), in order, `workers` processes ahead, pinned for CUDA."""
    # its own generator: the workers' seed is drawn from it, not from the global RNG that SpecAugment and
    # dropout draw from (which would shift every later mask)
    return torch.utils.data.DataLoader(_TrainBatches(task), sampler=batches, batch_size=None, num_workers=workers,
                                       pin_memory=pin, prefetch_factor=2 if workers else None,
                                       generator=torch.Generator().manual_seed(0))


class DownstreamJob(Job):
    """A Trainable as the loop's job: epochs of length-bucketed batches (the data position is part of the
    resumable state), dev evaluation keeping the best weights in best.pt, the history in metrics.csv. Under
    torchrun each rank's step is its shard of the batch, and rank 0 alone evaluates and writes."""

    def __init__(self, task: Trainable, cfg: TrainConfig, seed: int, device: torch.device, state_dir: Path,
                 run_dir: Path | None):
        self.task, self.cfg, self.seed, self.device = task, cfg, seed, device
        self.model = task.model.to(device)
        self.optimizer = task.make_optimizer()
        self.lengths = list(task.train_lengths())
        if not self.lengths:
            raise TrainingError("no training items: the training split is empty")
        self.metric, self.best_path = task.select_metric, state_dir / "best.pt"
        self.csv_paths = [state_dir / "metrics.csv"] + ([Path(run_dir) / "metrics.csv"] if run_dir else [])
        self.epoch, self.pos, self.best, self.best_step, self.history = 0, 0, {}, 0, []
        self._batches: tuple[int, list[list[int]]] = (-1, [])
        self._loader = None  # ((epoch, position), iterator over the DataLoader's batches)

    def _epoch_batches(self) -> list[list[int]]:
        if self._batches[0] != self.epoch:
            self._batches = (self.epoch, epoch_batches(self.lengths, self.cfg, self.seed, self.epoch))
        return self._batches[1]

    def _ahead(self) -> bool:
        return self.cfg.num_workers > 0 and hasattr(self.task, "load_batch")

    def _batch(self):
        """This step's batch: made here, or (train.num_workers > 0) taken from the DataLoader that loads the
        batches ahead from the current position on (so a resumed run reads what it would have)."""
        if not self._ahead():
            indices = distributed.shard(self._epoch_batches()[self.pos])  # all of it in a single process
            return self.task.make_batch(indices, self.device) if indices else None
        if self._loader is None or self._loader[0] != (self.epoch, self.pos):
            stream = _BatchStream(self.lengths, self.cfg, self.seed, self.epoch, self.pos)
            self._loader = (None, iter(batch_loader(self.task, stream, self.cfg.num_workers,
                                                    pin=self.device.type == "cuda")))
        payload = next(self._loader[1])
        last = self.pos + 1 >= len(self._epoch_batches())
        self._loader = ((self.epoch + 1, 0) if last else (self.epoch, self.pos + 1), self._loader[1])
        return self.task.finish_batch(payload, self.device) if payload is not None else None

    def step(self, index: int) -> Step | None:
        if self.pos >= len(self._epoch_batches()):
            self.epoch, self.pos = self.epoch + 1, 0
        batch = self._batch()
        self.pos += 1
        if batch is None:
            return None
        with autocast_ctx(self.cfg, self.device):
            loss, n = self.task.loss(batch)
        return Step(loss, items=n)

    def log(self, step: int, averages: dict[str, float], lr: float, wall_s: float) -> dict:
        avg = averages["loss"]
        self.history.append({"step": step, "split": "train", "metric": "loss", "value": round(avg, 6)})
        return {"loss": f"{avg:.3f}", **({f"dev_{self.metric}": f"{self.best[self.metric]:.2f}"} if self.best else {})}

    def evaluate(self, step: int) -> dict:
        with autocast_ctx(self.cfg, self.device):
            dev = self.task.evaluate("dev", self.device)
        for k, v in dev.items():
            self.history.append({"step": step, "split": "dev", "metric": k, "value": v})
        value = dev[self.metric]
        if not self.best or (math.isfinite(value) and not value >= self.best[self.metric]):
            self.best, self.best_step = dict(dev), step
            torch_save_atomic({"version": STATE_VERSION, "model": self.model.state_dict(), "step": step, "dev": dev},
                              self.best_path)
        self.write_metrics(self.csv_paths)
        return {**dev, "best": self.best[self.metric]}  # numbers: the loop logs them as dev_<key>

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "best": self.best, "best_step": self.best_step,
                "history": self.history}

    def load(self, state: dict) -> None:
        self.epoch, self.pos, self.best = state["epoch"], state["pos"], state["best"]
        self.best_step, self.history = state["best_step"], state["history"]

    def write_metrics(self, paths: list[Path]) -> None:
        """The history so far as metrics.csv at each of `paths` (rewritten whole)."""
        for p in paths:
            write_csv(p, METRICS_FIELDS, self.history)


def fit(task: Trainable, cfg: TrainConfig, *, seed: int, state_dir: Path, run_dir: Path | None = None,
        progress: bool = True, on_step: Callable[[int], None] | None = None,
        desc: str = "train") -> FitResult:
    """Train `task.model` for cfg.max_steps steps, evaluating on 'dev' every cfg.eval_every steps.

    State (model, optimizer, RNG states, data position, best-so-far, history) is saved atomically
    to state_dir/last.pt every cfg.save_every steps; with cfg.resume a later call continues from it and,
    on CPU, ends with exactly the result of an uninterrupted run. On return task.model holds the best
    weights (by task.select_metric on dev). `on_step(step)` is called after each step (and after that
    step's checkpoint), e.g. to stop a run early. Under torchrun the ranks train together (qspeech.distributed),
    rank 0 alone writing run_dir and the state, in state_dir/ranks<N>; every rank returns rank 0's record and
    best weights.
    """
    with torch_threads(cfg.num_threads), distributed.session(resolve_device(cfg)):
        return _fit(task, cfg, seed=seed, state_dir=Path(state_dir), run_dir=run_dir, progress=progress,
                    on_step=on_step, desc=desc)


def _fit(task, cfg, *, seed, state_dir, run_dir, progress, on_step, desc) -> FitResult:
    device = resolve_device(cfg)
    if distributed.active():  # a state of its own: other float sums and RNG streams than one process's
        state_dir = state_dir / f"ranks{distributed.world_size()}"
    state_dir.mkdir(parents=True, exist_ok=True)
    if run_dir and distributed.is_main():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    job = DownstreamJob(task, cfg, seed, device, state_dir, run_dir)
    job.model.train()
    res = run(job, LoopConfig(
        total=cfg.max_steps, desc=desc, schedule=lambda lr, step: lr * lr_factor(cfg, step), grad_clip=cfg.grad_clip,
        log_every=cfg.log_every, eval_every=cfg.eval_every, ckpt_every=cfg.save_every or cfg.eval_every,
        state_path=state_dir / "last.pt", resume=cfg.resume, seed=seed, progress=progress,
        hint="lower the learning rate or check the data", on_step=on_step, distributed=distributed.active()))
    if distributed.active():  # the others did not evaluate; rank 0 has written best.pt by now
        job.best, job.best_step, job.history = distributed.broadcast((job.best, job.best_step, job.history))
    if distributed.is_main():
        if res.steps > res.resumed_from or not (state_dir / "metrics.csv").exists():
            job.write_metrics(job.csv_paths)
        elif run_dir:
            job.write_metrics(job.csv_paths[1:])
    if job.best_path.exists():
        job.model.load_state_dict(read_checkpoint(job.best_path)["model"])
    job._loader = None  # ends the DataLoader's workers
    job.model.eval()
    return FitResult(res.steps, job.best_step, job.best, res.wall_s, res.step_s, res.items, res.resumed_from,
                     job.history)
