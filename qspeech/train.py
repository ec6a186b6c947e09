"""A task-agnostic training loop: length-bucketed batches, periodic evaluation keeping the best model,
atomic checkpoints that a killed run resumes from (reaching the same result on CPU), NaN/inf guard.

The loop only sees a `Trainable` (see below): it knows nothing about speech or CTC.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from qspeech.atomic import torch_save_atomic, write_text_atomic
from qspeech.config import check_keys, plain
from qspeech.errors import ConfigError, TrainingError
from qspeech.seeding import rng_state, seed_everything, set_rng_state

CKPT_VERSION = 1


@dataclass
class TrainConfig:
    """The `train` config group (conf/train/*.yaml)."""

    name: str = "cpu"
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    amp: str = "auto"  # auto (bf16 autocast on CUDA, none on CPU) | bf16 | off
    max_steps: int = 1500
    batch_size: int = 16
    # Batches whose longest utterance is longer than this (seconds) are split in two (s3prl's
    # HALF_BATCHSIZE_TIME). null: never.
    half_batch_above_s: float | None = None
    # Length bucketing: each epoch is shuffled, cut into windows of this many batches, sorted by length
    # within a window, batched, and the batch order shuffled again.
    bucket_window: int = 50
    eval_every: int = 250
    save_every: int | None = None  # checkpoint interval in steps; null: eval_every
    log_every: int = 50
    grad_clip: float = 1.0  # max global grad norm; 0 or null: no clipping
    # Learning-rate schedule over max_steps: constant (s3prl's SUPERB ASR) | linear (decay to 0: a short
    # run ends annealed instead of at its noisiest); warmup_steps of linear warmup first.
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    resume: bool = True
    # Where the resumable training state lives; null: <cache_dir>/runs/<hash of everything that
    # determines the result>, so re-running a killed command resumes it whatever its output folder.
    ckpt_dir: str | None = None
    # Upstream feature cache: auto (on when the estimated size fits cache_max_gb) | true | false.
    cache_features: Any = "auto"
    cache_max_gb: float = 20.0
    feature_batch_s: float = 60.0  # seconds of (padded) audio per upstream forward when extracting
    eval_batch_size: int = 16
    num_threads: int | None = None  # torch CPU threads; null: torch's default


def validate_train_config(train_cfg) -> TrainConfig:
    """Return the typed TrainConfig or raise ConfigError (one line)."""
    d = plain(train_cfg)
    d.pop("defaults", None)
    check_keys(TrainConfig, d, "train")
    try:
        c = TrainConfig(**d)
    except TypeError as e:  # pragma: no cover - dataclass signature errors
        raise ConfigError(f"train: {e}") from None

    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(f"train.{msg}")

    need(c.device in ("auto", "cpu", "cuda") or str(c.device).startswith("cuda:"),
         f"device={c.device!r}: use auto, cpu or cuda")
    need(c.amp in ("auto", "bf16", "off"), f"amp={c.amp!r}: use auto, bf16 or off")
    need(c.lr_schedule in ("constant", "linear"), f"lr_schedule={c.lr_schedule!r}: use constant or linear")
    need(isinstance(c.warmup_steps, int) and 0 <= c.warmup_steps < c.max_steps,
         f"warmup_steps={c.warmup_steps!r}: must be an integer in [0, max_steps)")
    for k in ("max_steps", "batch_size", "bucket_window", "eval_every", "log_every", "eval_batch_size"):
        v = getattr(c, k)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{k}={v!r}: must be an integer >= 1")
    need(c.save_every is None or (isinstance(c.save_every, int) and c.save_every >= 1),
         f"save_every={c.save_every!r}: must be null or an integer >= 1")
    need(c.half_batch_above_s is None or c.half_batch_above_s > 0,
         f"half_batch_above_s={c.half_batch_above_s!r}: must be null or > 0")
    need(c.grad_clip is None or c.grad_clip >= 0, f"grad_clip={c.grad_clip!r}: must be >= 0 or null")
    need(c.cache_features in ("auto", True, False), f"cache_features={c.cache_features!r}: use auto, true or false")
    need(c.cache_max_gb >= 0, f"cache_max_gb={c.cache_max_gb!r}: must be >= 0")
    need(c.feature_batch_s > 0, f"feature_batch_s={c.feature_batch_s!r}: must be > 0")
    need(isinstance(c.resume, bool), f"resume={c.resume!r}: must be true or false")
    need(c.num_threads is None or (isinstance(c.num_threads, int) and c.num_threads >= 1),
         f"num_threads={c.num_threads!r}: must be null or >= 1")
    return c


def linear_warmup_decay(peak: float, step: int, total: int, warmup: int) -> float:
    """Learning rate of the update that takes `step` to `step + 1`: linear warmup to `peak` over `warmup`
    steps, then linear decay to 0 at `total` (fairseq's polynomial_decay, power 1)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the task's learning rate for the update that takes `step` to `step + 1`."""
    if cfg.lr_schedule == "linear":
        return linear_warmup_decay(1.0, step, cfg.max_steps, cfg.warmup_steps)
    return (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else 1.0


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
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={cfg.device}: no CUDA device is available; use train.device=auto or cpu")
    return torch.device(cfg.device)


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




def _load(path: Path) -> dict:
    # Our own checkpoints hold only tensors, numbers, strings and containers: no unpickling needed.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise TrainingError(f"cannot read training checkpoint {path} ({type(e).__name__}: {e}); "
                            f"delete it or set train.resume=false") from None


def _write_csv(rows: list[dict], paths: list[Path]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "split", "metric", "value"], lineterminator="\r\n")
    w.writeheader()
    w.writerows(rows)
    for p in paths:
        write_text_atomic(p, buf.getvalue())


def fit(task: Trainable, cfg: TrainConfig, *, seed: int, state_dir: Path, run_dir: Path | None = None,
        progress: bool = True, on_step: Callable[[int], None] | None = None,
        desc: str = "train") -> FitResult:
    """Train `task.model` for cfg.max_steps steps, evaluating on 'dev' every cfg.eval_every steps.

    State (model, optimizer, RNG states, data position, best-so-far, history) is saved atomically
    to state_dir/last.pt every cfg.save_every steps; with cfg.resume a later call continues from it and,
    on CPU, ends with exactly the result of an uninterrupted run. On return task.model holds the best
    weights (by task.select_metric on dev). `on_step(step)` is called after each step (and after that
    step's checkpoint), e.g. to stop a run early.
    """
    with torch_threads(cfg.num_threads):
        return _fit(task, cfg, seed=seed, state_dir=state_dir, run_dir=run_dir, progress=progress, on_step=on_step,
                    desc=desc)


def _fit(task, cfg, *, seed, state_dir, run_dir, progress, on_step, desc) -> FitResult:
    from tqdm.auto import tqdm

    device = resolve_device(cfg)
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    if run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    last_path, best_path = state_dir / "last.pt", state_dir / "best.pt"
    csv_paths = [state_dir / "metrics.csv"] + ([Path(run_dir) / "metrics.csv"] if run_dir else [])
    save_every = cfg.save_every or cfg.eval_every
    metric = task.select_metric

    model = task.model.to(device)
    optimizer = task.make_optimizer()
    # A function of the step alone, so a resumed run continues the same schedule.
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    lengths = list(task.train_lengths())
    if not lengths:
        raise TrainingError("no training items: the training split is empty")

    step, epoch, pos = 0, 0, 0
    best: dict[str, float] = {}
    best_step, wall_s, step_s, items, history = 0, 0.0, 0.0, 0, []
    resumed_from = 0
    if cfg.resume and last_path.exists():
        ck = _load(last_path)
        if ck.get("version") != CKPT_VERSION:
            raise TrainingError(f"{last_path} was written by another version; delete it or set train.resume=false")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"])
        step, epoch, pos = ck["step"], ck["epoch"], ck["pos"]
        best, best_step = ck["best"], ck["best_step"]
        wall_s, step_s, items, history = ck["wall_s"], ck["step_s"], ck["items"], ck["history"]
        resumed_from = step
    else:
        seed_everything(seed)

    def save_last():
        torch_save_atomic({"version": CKPT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "rng": rng_state(), "step": step, "epoch": epoch, "pos": pos, "best": best,
                      "best_step": best_step, "wall_s": wall_s + time.perf_counter() - t_start,
                      "step_s": step_s, "items": items, "history": history}, last_path)

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                autocast_ctx(cfg, device):
            out = task.evaluate("dev", device)
        model.train()
        return out

    t_start = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=step, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    run_loss, run_n = 0.0, 0
    model.train()
    while step < cfg.max_steps:
        batches = epoch_batches(lengths, cfg, seed, epoch)
        while pos < len(batches) and step < cfg.max_steps:
            t0 = time.perf_counter()
            batch = task.make_batch(batches[pos], device)
            pos += 1
            if batch is None:
                continue
            with autocast_ctx(cfg, device):
                loss, n = task.loss(batch)
            if not torch.isfinite(loss.detach()).item():
                raise TrainingError(f"loss is {loss.item()} at step {step + 1}: training diverged; "
                                    f"lower the learning rate or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                gnorm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if not torch.isfinite(gnorm).item():
                    raise TrainingError(f"gradient norm is {gnorm.item()} at step {step + 1}: training diverged; "
                                        f"lower the learning rate")
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * lr_factor(cfg, step)
            optimizer.step()
            step += 1
            step_s += time.perf_counter() - t0
            items += n
            run_loss += loss.item() * n
            run_n += n
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                avg = run_loss / max(run_n, 1)
                history.append({"step": step, "split": "train", "metric": "loss", "value": round(avg, 6)})
                bar.set_postfix(loss=f"{avg:.3f}", **({f"dev_{metric}": f"{best[metric]:.2f}"} if best else {}))
                run_loss, run_n = 0.0, 0
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                dev = evaluate()
                for k, v in dev.items():
                    history.append({"step": step, "split": "dev", "metric": k, "value": v})
                value = dev[metric]
                if not best or (math.isfinite(value) and not value >= best[metric]):
                    best, best_step = dict(dev), step
                    torch_save_atomic({"version": CKPT_VERSION, "model": model.state_dict(), "step": step,
                                  "dev": dev}, best_path)
                bar.set_postfix(dev=f"{value:.2f}", best=f"{best[metric]:.2f}")
                _write_csv(history, csv_paths)
            if step % save_every == 0 or step == cfg.max_steps:
                save_last()
            if on_step is not None:
                on_step(step)
        if pos >= len(batches):
            epoch, pos = epoch + 1, 0
    bar.close()
    wall_s += time.perf_counter() - t_start
    if step > resumed_from or not (state_dir / "metrics.csv").exists():
        _write_csv(history, csv_paths)
    elif run_dir:
        _write_csv(history, csv_paths[1:])
    if best_path.exists():
        model.load_state_dict(_load(best_path)["model"])
    model.eval()
    return FitResult(step, best_step, best, wall_s, step_s, items, resumed_from, history)
