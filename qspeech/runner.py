"""One experiment: config -> upstream -> accounting -> quantization -> downstream task -> result.json."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qspeech.atomic import ensure_folder, folder_lock, folder_problem, storage_error
from qspeech.config import RunConfig
from qspeech.errors import QSpeechError, StorageError
from qspeech.results import COST_FILE, FAILURE_FILE, RESULT_FILE, RunResult, git_commit, write_json_atomic
from qspeech.seeding import seed_everything

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def compute_cost(cfg: RunConfig, upstream) -> "CostReport":  # noqa: F821
    """Accounting of `upstream` as `cfg.quant` will quantize it (same module selection as the quantizer)."""
    from qspeech.cost import account_quantized

    return account_quantized(upstream, cfg.quant, int(cfg.bits), float(cfg.cost.seconds))


def write_cost(cfg: RunConfig, cost, run_dir: Path) -> dict:
    """cost.json of a run folder: the accounting and what it describes."""
    out = cost.to_dict() | {"model": cfg.model.name, "quant": cfg.quant.method, "targets": list(cfg.quant.targets),
                            "bits": int(cfg.bits)}
    write_json_atomic(Path(run_dir) / COST_FILE, out)
    return out


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


def check_output_folders(cfg: DictConfig) -> None:
    """StorageError (one line) if Hydra could not create or write the run / sweep folder of a composed
    config (with its hydra node): Hydra opens its log file there before any qspeech code runs."""
    for key in ("run.dir", "sweep.dir"):
        try:
            folder = str(OmegaConf.select(cfg, f"hydra.{key}", throw_on_missing=True))
        except Exception:  # noqa: BLE001 - a folder name Hydra resolves itself at run time: its own check
            continue
        problem = folder_problem(folder)
        if problem:
            raise StorageError(f"output folder {folder}: {problem}; run from a writable folder or set "
                               f"hydra.{key}=/a/writable/folder")


def run(cfg: RunConfig, run_dir: Path, progress: bool = True) -> RunResult:
    """Run one experiment (cfg: checked by qspeech.config.to_typed); result.json is written (atomically)
    whatever happens once it has started. One process per run folder: a second one is refused
    (RunLockedError) before it touches anything; a lock left by a killed process is taken over."""
    run_dir = ensure_folder(run_dir, "the run folder", "run from a writable folder or set hydra.run.dir=...")
    ensure_folder(cfg.cache_dir, "cache_dir (QSPEECH_CACHE)", "set QSPEECH_CACHE to a writable folder")
    with folder_lock(run_dir) as stale:
        if stale:
            log.warning("took over %s from a run that stopped without finishing (%s)", run_dir, stale)
        return _run_locked(cfg, run_dir, progress)


def _run_locked(cfg: RunConfig, run_dir: Path, progress: bool) -> RunResult:
    from qspeech.data import record_skips
    from qspeech.upstream import build_upstream, fingerprint

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

        from qspeech.quantize_upstream import quantize_upstream

        with record_skips() as skips:  # audio the data layer left out before any stage read it
            t = time.perf_counter()
            upstream = quantize_upstream(cfg, upstream, run_dir, progress)
            # Evaluate exactly what the packed file stores: fp16 scales and fp16 non-quantized tensors.
            from qspeech.quant import round_to_storage_
            from qspeech.identity import identity_dict

            round_to_storage_(upstream)
            timings["quantize_s"] = time.perf_counter() - t

            from qspeech.tasks import run_task

            t = time.perf_counter()
            key = fingerprint(upstream, extra=json.dumps(identity_dict(cfg.quant), sort_keys=True) + f"|bits={cfg.bits}")
            metrics = run_task(cfg, upstream, run_dir, key, progress=progress)
            timings["task_s"] = time.perf_counter() - t
        _count_skips(metrics, skips)
        result.add_metrics(metrics)

        if cfg.export:
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
    except BaseException as e:  # KeyboardInterrupt included: the result says the run did not finish
        result.fail(f"{type(e).__name__}: {e}")
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
    from qspeech.export import export_packed

    # The compact packed file only: the s3prl-format copy is full size (~380 MB for HuBERT Base), too much for
    # every job of a sweep; `qspeech export` with the same overrides writes it.
    return export_packed(upstream, cfg.quant, int(cfg.bits), run_dir / "upstream.packed.safetensors", s3prl=False)
