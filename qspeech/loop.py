"""The one training loop: downstream heads (qspeech.train), HuBERT pretraining and DistilHuBERT distillation
(qspeech.pretrain), quantization-aware distillation (qspeech.quantize_upstream).

A `Job` says what one step computes; the loop owns everything around it: the learning-rate schedule, the
optimizer update with gradient clipping, the NaN/inf guard, the progress bar and progress lines (logging),
log averages sent to the experiment logger (qspeech.loggers), periodic evaluation, and the resumable state: one format, written atomically, read with weights_only=True, from
which a killed run continues to exactly the numbers of an uninterrupted one on CPU. With LoopConfig.distributed
the job trains on torchrun's ranks (qspeech.distributed): one update from every rank's shard, rank 0 alone
logging, evaluating and writing the state (which holds every rank's RNG state). A scheduler's stop signal
(qspeech.preemption) saves the state at the next step boundary and raises Preempted.

    class Regression(Job):
        def __init__(self, model, data):
            self.model, self.data = model, data
            self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(self, index):  # a pure function of the step index: a resumed run sees the same batches
            x, y = self.data[index % len(self.data)]
            return Step(((self.model(x) - y) ** 2).mean(), items=len(x))

    run(Regression(model, data), LoopConfig(total=100, state_path=Path("state.pt")))
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from qspeech.atomic import torch_save_atomic
from qspeech import distributed, loggers, preemption
from qspeech.errors import TrainingError
from qspeech.seeding import rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Fields every resumable state holds; a job adds its own (Job.state). Files written before the version
# field existed (pretraining's state.pt) have all of these and read as version 1.
STATE_FIELDS = ("model", "optimizer", "rng", "step", "wall_s")


def linear_warmup_decay(peak: float, step: int, total: int, warmup: int, decay: bool = True) -> float:
    """The learning-rate schedule: the rate of the update that takes `step` to `step + 1`. Linear warmup to
    `peak` over `warmup` steps, then linear decay to 0 at `total` (fairseq's polynomial_decay, power 1), or
    with decay=False constant at `peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if not decay:
        return peak
    return peak * max(0.0, (total - step) / max(1, total - warmup))


class Step(NamedTuple):
    """What a job's step returns: the loss to minimise, metrics to log (averaged over each log interval),
    and the number of items in the batch (weights the averages; summed in LoopResult.items)."""

    loss: torch.Tensor
    metrics: dict[str, float] = {}
    items: int = 1


class Job:
    """The protocol between the loop and what it trains. `model` is trained and checkpointed (its
    state_dict), `optimizer` updates it; `step` is required, the other hooks are optional."""

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def step(self, index: int) -> Step | None:
        """Forward pass of training step `index` (0-based). None: no usable batch, the loop asks again
        (the step is not counted)."""
        raise NotImplementedError

    def log(self, step: int, averages: dict[str, float], lr: float, wall_s: float) -> dict | None:
        """Every LoopConfig.log_every steps and after the last: averages of the interval's metrics ("loss",
        the step's metrics, "grad_norm" when clipping), the current learning rate of the first parameter
        group and the run's wall time. Returns the progress bar's postfix."""
        return {"loss": f"{averages['loss']:.3f}"}

    def evaluate(self, step: int) -> dict | None:
        """Every LoopConfig.eval_every steps and after the last, with the model in eval mode, no grad and
        the RNG state forked (evaluation changes nothing the training sees). Returns the bar's postfix; its
        numbers also go to the experiment logger as <prefix>/dev_<key>."""

    def state(self) -> dict[str, Any]:
        """The job's own fields of the resumable state (tensors, numbers, strings and containers)."""
        return {}

    def accepts(self, state: dict) -> bool:
        """Whether a saved state belongs to this run (False: start over)."""
        return True

    def load(self, state: dict) -> None:
        """Restore the job's fields on resume (model, optimizer and RNG are restored by the loop)."""


@dataclass
class LoopConfig:
    """How `run` trains a job: the length, the schedules (update, log, evaluation, checkpoint), the guards."""

    total: int  # steps of the whole run
    desc: str = "train"  # progress bar, errors
    schedule: Callable[[float, int], float] | None = None  # (base lr, step) -> lr of that update; None: constant
    grad_clip: float | None = None  # max global gradient norm; 0 or None: no clipping
    log_every: int = 50
    eval_every: int | None = None  # None: Job.evaluate is never called
    ckpt_every: int | None = None  # resumable state every so many steps (and after the last); None: last only
    state_path: Path | None = None  # None: no resumable state
    resume: bool = True
    seed: int | None = None  # a fresh run seeds every RNG with it first; None: the caller has seeded
    progress: bool = True
    hint: str = "lower the learning rate"  # what the divergence error advises
    on_step: Callable[[int], None] | None = None  # after each step and its checkpoint (e.g. to stop a run)
    stop_after: int | None = None  # return after this step as if interrupted (tests)
    # Where train loss, learning rate and dev metrics go; None: the running experiment's logger
    # (qspeech.loggers.active(), set by the CLI), if any.
    logger: loggers.MetricLogger | None = None
    log_prefix: str | None = None  # keys are <prefix>/<name>; None: the first word of desc
    # Train across torchrun's ranks (qspeech.distributed, whose process group is up): each job's step is
    # its rank's shard of the global batch; only rank 0 logs, evaluates and writes the state.
    distributed: bool = False


@dataclass
class LoopResult:
    """What `run` returns (the job holds the rest: its model, its own records)."""

    steps: int  # the step reached
    resumed_from: int  # the step this invocation started at (0: fresh)
    wall_s: float  # wall time of the loop, evaluations included, summed over invocations
    wall_this_s: float  # that of this invocation
    step_s: float  # time inside steps (forward, backward, update), summed over invocations
    items: int  # items seen in steps, summed over invocations
    last: dict[str, float] = field(default_factory=dict)  # averages of this invocation's last log interval


def read_checkpoint(path: Path) -> dict:
    """A checkpoint the loop or a job wrote: only tensors, numbers, strings and containers, so no unpickling
    (TrainingError with the fix when unreadable)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise TrainingError(f"cannot read training checkpoint {path} ({type(e).__name__}: {e}); "
                            f"delete it to start over") from None


def load_state(path: Path) -> dict:
    """A resumable state file, checked (TrainingError with the fix when unreadable or of another format)."""
    state = read_checkpoint(path)
    if state.get("version", STATE_VERSION) != STATE_VERSION or any(k not in state for k in STATE_FIELDS):
        raise TrainingError(f"{path} was written by another version of qspeech; delete it to start over")
    return state


class _Averager:
    """Item-weighted means of the metrics over one log interval."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, metrics: dict[str, float], items: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * items
        self.n += items

    def pop(self) -> dict[str, float]:
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return out


class _Run:
    """One invocation of the loop: counters, the bar, and the steps' bookkeeping."""

    def __init__(self, job: Job, cfg: LoopConfig):
        self.job, self.cfg = job, cfg
        self.main = not cfg.distributed or distributed.is_main()
        self.base_lrs = [g["lr"] for g in job.optimizer.param_groups]  # before a resumed state changes them
        self.step, self.wall_s, self.step_s, self.items = 0, 0.0, 0.0, 0
        self.avg, self.last = _Averager(), {}
        self.resumed_from = self._resume()
        if self.resumed_from is None:
            self.resumed_from = 0
            if cfg.seed is not None:  # each rank draws its own dropout / augmentation (rank 0: as one process)
                seed_everything(cfg.seed + (distributed.rank() if cfg.distributed else 0))
        if cfg.distributed:  # replicas start equal whatever their initialisation did
            distributed.broadcast_tensors(list(job.model.state_dict().values()))
        self.t_start = time.perf_counter()
        self.logger = cfg.logger if cfg.logger is not None else loggers.active()
        self.prefix = cfg.log_prefix or (cfg.desc.split() or ["train"])[0]

    def report(self, kind: str, values: dict, extra: dict | None = None) -> None:
        """A progress line (logging: the run's qspeech.log) and the numbers to the experiment logger."""
        shown = {**values, **(extra or {})}
        log.info("%s: step %d/%d %s %s", self.cfg.desc, self.step, self.cfg.total, kind,
                 " ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
        if self.logger is not None:
            numbers = {f"{self.prefix}/{kind}_{k}": float(v) for k, v in values.items() if _is_number(v)}
            numbers.update({f"{self.prefix}/{k}": float(v) for k, v in (extra or {}).items() if _is_number(v)})
            if numbers:
                self.logger.log_metrics(numbers, self.step)

    def _resume(self) -> int | None:
        cfg, job = self.cfg, self.job
        if not (cfg.resume and cfg.state_path is not None and Path(cfg.state_path).exists()):
            return None
        state = load_state(Path(cfg.state_path))
        if not job.accepts(state):
            return None
        job.model.load_state_dict(state["model"])
        job.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(self._own_rng(state))
        self.step, self.wall_s = int(state["step"]), float(state["wall_s"])
        self.step_s, self.items = float(state.get("step_s", 0.0)), int(state.get("items", 0))
        # the log interval the checkpoint fell inside: its first log after resuming averages the same steps
        interval = state.get("log_interval") or {}
        self.avg.sums, self.avg.n = dict(interval.get("sums", {})), int(interval.get("n", 0))
        job.load(state)
        return self.step

    def _own_rng(self, state: dict) -> dict:
        """This process's RNG state in a saved state: across ranks, its rank's."""
        if not self.cfg.distributed:
            return state["rng"]
        rngs = state.get("rngs") or []
        if len(rngs) != distributed.world_size():
            raise TrainingError(f"{self.cfg.state_path} was not written by a run on {distributed.world_size()} "
                                f"processes; delete it to start over")
        return rngs[distributed.rank()]

    def wall(self) -> float:
        return self.wall_s + time.perf_counter() - self.t_start

    def update(self, out: Step) -> float | None:
        """Backward, clipping, the scheduled learning rate, the optimizer step; returns the gradient norm."""
        cfg, opt, n = self.cfg, self.job.optimizer, self.step + 1
        if not torch.isfinite(out.loss.detach()).item():
            raise TrainingError(f"{cfg.desc}: the loss is {out.loss.item()} at step {n}: training diverged; {cfg.hint}")
        if not cfg.distributed:  # distributed: share() has set the global batch's gradients
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
        gnorm = None
        if cfg.grad_clip:
            gnorm = nn.utils.clip_grad_norm_(self.job.model.parameters(), float(cfg.grad_clip))
            if not torch.isfinite(gnorm).item():
                raise TrainingError(f"{cfg.desc}: the gradient norm is {gnorm.item()} at step {n}: training "
                                    f"diverged; {cfg.hint}")
        if cfg.schedule is not None:
            for g, lr in zip(opt.param_groups, self.base_lrs):
                g["lr"] = cfg.schedule(lr, self.step)
        opt.step()
        return None if gnorm is None else float(gnorm)

    def share(self, out: Step | None) -> Step | None:
        """Across ranks: backward of this rank's shard, then the gradients, loss and item count of the global
        batch (a NaN on any rank makes the global loss NaN; the step's other metrics stay this rank's); None
        when no rank had a usable shard."""
        params = [p for p in self.job.model.parameters() if p.requires_grad]
        self.job.optimizer.zero_grad(set_to_none=True)
        if out is not None:
            out.loss.backward()
        loss, items = distributed.all_reduce_gradients(
            params, float(out.loss.detach()) if out is not None else 0.0, out.items if out is not None else 0)
        return Step(torch.tensor(loss), out.metrics if out is not None else {}, items) if items else None

    def evaluate(self) -> dict | None:
        model = self.job.model
        device = next(model.parameters(), torch.empty(0)).device
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            out = self.job.evaluate(self.step)
        model.train(was_training)
        return out

    def save(self) -> None:
        job, rng = self.job, rng_state()
        ranks = {"rngs": distributed.all_gather(rng)} if self.cfg.distributed else {}  # rank 0 writes them all
        if not self.main:
            return
        torch_save_atomic({"version": STATE_VERSION, "model": job.model.state_dict(),
                           "optimizer": job.optimizer.state_dict(), "rng": rng, "step": self.step,
                           "wall_s": self.wall(), "step_s": self.step_s, "items": self.items,
                           "log_interval": {"sums": dict(self.avg.sums), "n": self.avg.n}, **ranks, **job.state()},
                          self.cfg.state_path)

    def preempted(self, signals: preemption.Watch) -> preemption.Preempted:
        """A stop signal arrived: the state is saved at this step boundary; the exception that ends the run."""
        where = f"at step {self.step}/{self.cfg.total} of {self.cfg.desc}"
        if self.cfg.state_path is not None:
            self.save()
            where += f" (state saved in {self.cfg.state_path})"
        return signals.preempted(where)

    def after_step(self, out: Step, gnorm: float | None, bar) -> None:
        """Logging, evaluation and the checkpoint, each on its schedule."""
        cfg, job, step = self.cfg, self.job, self.step
        metrics = {"loss": float(out.loss.detach()), **out.metrics}
        if gnorm is not None:
            metrics["grad_norm"] = gnorm
        self.avg.add(metrics, out.items)
        bar.update(1)
        done = step == cfg.total
        if step % cfg.log_every == 0 or done:
            self.last = self.avg.pop()
            lr = self.job.optimizer.param_groups[0]["lr"]
            if self.main:
                _postfix(bar, job.log(step, self.last, lr, self.wall()))
                self.report("train", self.last, {"lr": lr})
        if cfg.eval_every and (step % cfg.eval_every == 0 or done) and self.main:
            out = self.evaluate()
            _postfix(bar, out)
            if out:
                self.report("dev", out)
        if cfg.state_path is not None and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or done):
            self.save()
        if cfg.on_step is not None:
            cfg.on_step(step)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _postfix(bar, postfix: dict | None) -> None:
    if postfix:
        bar.set_postfix(postfix, refresh=False)


def run(job: Job, cfg: LoopConfig) -> LoopResult:
    """Train `job` up to step cfg.total, resuming from cfg.state_path when it holds this run's state."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    r = _Run(job, cfg)
    bar = tqdm(total=cfg.total, initial=r.step, desc=cfg.desc, disable=not (cfg.progress and r.main),
               dynamic_ncols=True, leave=False, mininterval=1 if os.isatty(2) else 30)
    # progress lines printed through the bar, not across it
    with logging_redirect_tqdm() if cfg.progress else contextlib.nullcontext(), preemption.watch() as signals:
        _loop(job, cfg, r, bar, signals)
    wall_this = time.perf_counter() - r.t_start
    return LoopResult(r.step, r.resumed_from, r.wall_s + wall_this, wall_this, r.step_s, r.items, r.last)


def _stop_requested(cfg: LoopConfig, signals: preemption.Watch) -> bool:
    """A stop signal reached this process; distributed: any rank, so that every rank stops at the same step."""
    return any(distributed.all_gather(signals.requested)) if cfg.distributed else signals.requested


def _loop(job: Job, cfg: LoopConfig, r: _Run, bar, signals: preemption.Watch) -> None:
    try:
        while r.step < cfg.total:
            t0 = time.perf_counter()
            out = job.step(r.step)
            if cfg.distributed:
                out = r.share(out)
            if out is None:
                continue
            gnorm = r.update(out)
            r.step += 1
            r.step_s += time.perf_counter() - t0
            r.items += out.items
            r.after_step(out, gnorm, bar)
            if _stop_requested(cfg, signals):  # SIGTERM / SIGUSR1 / SIGUSR2 (qspeech.preemption): save, stop, be requeued
                raise r.preempted(signals)
            if cfg.stop_after is not None and r.step >= cfg.stop_after:
                break
    finally:
        bar.close()
