"""One experiment: config -> upstream -> accounting -> quantization -> downstream task -> result.json."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qspeech.config import RunConfig
from qspeech.errors import QSpeechError
from qspeech.results import COST_FILE, FAILURE_FILE, RESULT_FILE, RunResult, git_commit, write_json_atomic
from qspeech.seeding import seed_everything

log = logging.getLogger(__name__)


def run_id(cfg: DictConfig) -> str:
    """A short hash of the resolved config (minus Hydra's node): the same experiment always gets the same
    run folder, so a killed run restarted with the same command resumes there."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for k in ("hydra", "command"):
        plain.pop(k, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:8]


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


def run(cfg: RunConfig, run_dir: Path, progress: bool = True) -> RunResult:
    """Run one experiment (cfg: checked by qspeech.config.to_typed); result.json is written (atomically)
    whatever happens."""
    from qspeech.upstream import build_upstream, fingerprint

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
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

        from qspeech.qat import quantize_upstream

        t = time.perf_counter()
        upstream = quantize_upstream(cfg, upstream, run_dir, progress)
        # Evaluate exactly what the packed file stores: fp16 scales and fp16 non-quantized tensors.
        from qspeech.quant import round_to_storage_

        round_to_storage_(upstream)
        timings["quantize_s"] = time.perf_counter() - t

        from qspeech.tasks import run_task

        t = time.perf_counter()
        key = fingerprint(upstream, extra=json.dumps(dataclasses.asdict(cfg.quant), sort_keys=True)
                          + f"|bits={cfg.bits}")
        metrics = run_task(cfg, upstream, run_dir, key, progress=progress)
        timings["task_s"] = time.perf_counter() - t
        result.add_metrics(metrics)

        if cfg.export:
            result.add_packed(_export(cfg, upstream, run_dir))
        result.status = "ok"
    except QSpeechError as e:
        result.fail(str(e))
        raise
    except BaseException as e:  # KeyboardInterrupt included: the result says the run did not finish
        result.fail(f"{type(e).__name__}: {e}")
        raise
    finally:
        timings["wall_s"] = time.perf_counter() - t_start
        result.finish(_now(), timings)
        write_json_atomic(_result_path(run_dir, result.status), result.to_dict())
    return result


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

    return export_packed(upstream, cfg.quant, int(cfg.bits), run_dir / "upstream.packed.safetensors")
