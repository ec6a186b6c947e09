"""One experiment: config -> upstream -> accounting -> quantization -> downstream task -> result.json; and
`qspeech run` around it (the experiment logger, the summary line, the sweep objective it returns to Hydra)."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from qspeech import distributed, loggers
from qspeech.atomic import ensure_folder, folder_lock, storage_error
from qspeech.config import RunConfig
from qspeech.cost_command import compute_cost, write_cost
from qspeech.data import record_skips
from qspeech.errors import ConfigError, QSpeechError
from qspeech.export import export_packed
from qspeech.identity import identity_dict
from qspeech.quantize_upstream import quantize_upstream
from qspeech.quant import round_to_storage_
from qspeech.results import FAILURE_FILE, RESULT_FILE, RunResult, git_commit, write_json_atomic
from qspeech.seeding import seed_everything
from qspeech.tasks import run_task
from qspeech.train import resolve_device
from qspeech.upstream import build_upstream, fingerprint

log = logging.getLogger(__name__)
command_log = logging.getLogger("qspeech")  # the command's own lines


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def base_result(cfg: RunConfig) -> RunResult:
    """The record of an experiment that has just started: what it is, and where it runs from."""
    return RunResult(
        model=cfg.model.name,
        init=cfg.model.init,
        quant=cfg.quant.method,
        targets=list(cfg.quant.targets),
        bits=int(cfg.bits),
        task=cfg.task.name,
        data=cfg.data.name,
        status="running",
        git_commit=git_commit(),
        started=_now(),
        config=dataclasses.asdict(cfg),
    )


def run(cfg: RunConfig, run_dir: Path, progress: bool = True) -> RunResult:
    """Run one experiment (cfg: checked by qspeech.config.to_typed); result.json is written (atomically)
    whatever happens once it has started. One process per run folder: a second one is refused
    (RunLockedError) before it touches anything; a lock left by a killed process is taken over.

    Under torchrun (qspeech.distributed) every rank runs the experiment and trains the head with the others;
    rank 0 takes the lock and writes the run folder, the other ranks write theirs to a scratch folder that
    is deleted after (and export nothing)."""
    run_dir = ensure_folder(run_dir, "the run folder", "run from a writable folder or set hydra.run.dir=...")
    ensure_folder(cfg.cache_dir, "cache_dir (QSPEECH_CACHE)", "set QSPEECH_CACHE to a writable folder")
    with distributed.session(resolve_device(cfg.train) if distributed.launched() else None):
        if not distributed.is_main():
            with tempfile.TemporaryDirectory(prefix=f"qspeech-rank{distributed.rank()}-") as scratch:
                return _run_locked(cfg, Path(scratch), progress=False)
        with folder_lock(run_dir) as stale:
            if stale:
                log.warning("took over %s from a run that stopped without finishing (%s)", run_dir, stale)
            return _run_locked(cfg, run_dir, progress)


def _run_locked(cfg: RunConfig, run_dir: Path, progress: bool) -> RunResult:
    result = base_result(cfg)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    try:
        seed_everything(int(cfg.seed))  # random-init upstreams are reproducible too
        t = time.perf_counter()
        upstream = build_upstream(cfg.model)
        timings["load_s"] = time.perf_counter() - t

        cost = compute_cost(cfg, upstream)
        write_cost(cfg, cost, run_dir)
        result.add_cost(cost)

        with record_skips() as skips:  # audio the data layer left out before any stage read it
            t = time.perf_counter()
            with distributed.main_first():  # torchrun: rank 0 distils a QAT upstream, the others load it cached
                upstream = quantize_upstream(cfg, upstream, run_dir, progress)
            # Evaluate exactly what the packed file stores: fp16 scales and fp16 non-quantized tensors.
            round_to_storage_(upstream)
            timings["quantize_s"] = time.perf_counter() - t

            t = time.perf_counter()
            key = fingerprint(upstream, extra=json.dumps(identity_dict(cfg.quant), sort_keys=True) + f"|bits={cfg.bits}")
            metrics = run_task(cfg, upstream, run_dir, key, progress=progress)
            timings["task_s"] = time.perf_counter() - t
        _count_skips(metrics, skips)
        result.add_metrics(metrics)

        if cfg.export and distributed.is_main():
            result.add_packed(_export(cfg, upstream, run_dir))
        result.status = "ok"
    except QSpeechError as e:
        result.fail(str(e))
        raise
    except OSError as e:  # disk full, read-only, a file in the way: one line, not a traceback
        err = storage_error(e, f"the run's files in {run_dir}")
        result.fail(str(err) if err else f"{type(e).__name__}: {e}")
        if err is None:
            raise
        raise err from None
    except BaseException as e:  # KeyboardInterrupt, a scheduler's stop: the result says the run did not finish
        result.interrupted(e)
        raise
    finally:
        timings["wall_s"] = time.perf_counter() - t_start
        result.finish(_now(), timings)
        _write_result(run_dir, result)
    return result


def _count_skips(metrics, skips) -> None:
    """metrics.skipped_audio counts the files the task could not read and, added here, the ones the data
    layer had already left out (missing, empty or unreadable header): those never reach the task."""
    if getattr(metrics, "skipped_audio", None) is None:
        return
    left_out = {s.path for s in skips if s.kind == "audio"}
    metrics.skipped_audio += len(left_out)


def _write_result(run_dir: Path, result: RunResult) -> None:
    """Write result.json; if the disk refuses, a run that failed already keeps its own error (raised by the
    caller), a finished one fails with one line."""
    try:
        write_json_atomic(_result_path(run_dir, result.status), result.to_dict())
    except OSError as e:
        err = storage_error(e, f"result.json in {run_dir}")
        if err is None:
            raise
        if result.status == "ok":
            raise err from None
        log.error("%s", err)


def _result_path(run_dir: Path, status: str) -> Path:
    """A failed rerun never replaces an earlier successful result of the same experiment."""
    path = run_dir / RESULT_FILE
    if status != "ok" and path.is_file():
        try:
            if json.loads(path.read_text()).get("status") == "ok":
                return run_dir / FAILURE_FILE
        except (OSError, ValueError, AttributeError):  # AttributeError: a file that holds no JSON object
            pass
    return path


def _export(cfg: RunConfig, upstream, run_dir: Path) -> Path:
    # The compact packed file only: the s3prl-format copy is full size (~380 MB for HuBERT Base), too much for
    # every job of a sweep; `qspeech export` with the same overrides writes it.
    return export_packed(upstream, cfg.quant, int(cfg.bits), run_dir / "upstream.packed.safetensors", s3prl=False)


def objective(cfg: RunConfig, result: RunResult) -> float | list[float]:
    """What a sweeper optimises (cfg.optimized_metric): the dev score of the task's metric ("dev"), another
    dev_<metric>, or an accounting value; NaN when the run has no such number (a failed trial)."""
    names = cfg.optimized_metric if isinstance(cfg.optimized_metric, list) else [cfg.optimized_metric]
    values = []
    for name in names:
        if name == "dev" or name.startswith("dev_"):
            value = None if result.metrics is None else (
                result.metrics.dev_value if name == "dev" else getattr(result.metrics, name, None))
            if value is None:
                raise ConfigError(f"optimized_metric={name}: task {result.task} reports no such dev score")
        else:
            value = getattr(result, name)
        values.append(float("nan") if value is None else float(value))
    return values if isinstance(cfg.optimized_metric, list) else values[0]


def final_metrics(result: RunResult) -> dict[str, float]:
    """A finished run's numbers for the experiment logger."""
    out = {f"final/{k}": getattr(result, k) for k in ("storage_mb", "est_runtime", "params", "quantized_params")}
    if result.metrics is not None:
        m = result.metrics
        out |= {f"final/test_{m.metric}": m.value, f"final/dev_{m.metric}": m.dev_value,
                "final/best_step": m.best_step}
    return {k: float(v) for k, v in out.items() if v is not None}


def main(cfg: RunConfig, run_dir: Path) -> float | list[float]:
    """`qspeech run`: the experiment under the configured experiment logger, one summary line; returns the
    sweep objective (cfg.optimized_metric) to Hydra."""
    if not distributed.is_main():  # torchrun's other ranks: rank 0 logs and reports the run
        return objective(cfg, run(cfg, run_dir))
    params = loggers.flatten(dataclasses.asdict(cfg))
    with loggers.session(cfg.logger, run_dir, run_dir.name, params) as logger:
        result = run(cfg, run_dir)
        logger.log_metrics(final_metrics(result), step=(result.metrics.steps or 0) if result.metrics else 0)
    metric = f"{result.metric}={result.value:.2f}" if result.value is not None else ""
    quant = "full precision" if int(cfg.bits) >= 32 else f"{cfg.quant.method} {cfg.bits}-bit"
    command_log.info(f"[qspeech] {cfg.model.name} {quant} {cfg.task.name}: {metric} storage "
                     f"{result.storage_mb:.2f} MB, est. runtime {result.est_runtime:.3f} -> {run_dir}/result.json")
    return objective(cfg, result)
