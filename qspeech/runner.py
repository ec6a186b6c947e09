"""One experiment: config -> upstream -> accounting -> quantization -> downstream task -> result.json."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qspeech.config import validate
from qspeech.errors import QSpeechError
from qspeech.results import COST_FILE, RESULT_FILE, git_commit, write_json_atomic
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


def compute_cost(cfg: DictConfig, upstream) -> "CostReport":  # noqa: F821
    """Accounting of `upstream` as `cfg.quant` will quantize it (same module selection as the quantizer)."""
    from qspeech.cost import account
    from qspeech.quant import overhead_values
    from qspeech.quant.targets import select_targets

    q = cfg.quant
    chosen = select_targets(upstream.model, int(cfg.bits), q.targets, q.get("exclude", []), q.get("overrides", {}))
    return account(upstream, chosen, lambda shape, b: overhead_values(q, shape, b), float(cfg.cost.seconds))


def write_cost(cfg: DictConfig, cost, run_dir: Path) -> dict:
    """cost.json of a run folder: the accounting and what it describes."""
    out = cost.to_dict() | {"model": cfg.model.name, "quant": cfg.quant.method, "targets": list(cfg.quant.targets),
                            "bits": int(cfg.bits)}
    write_json_atomic(Path(run_dir) / COST_FILE, out)
    return out


def base_result(cfg: DictConfig) -> dict:
    return {
        "model": cfg.model.name,
        "init": cfg.model.init,
        "quant": cfg.quant.method,
        "targets": list(cfg.quant.targets),
        "bits": int(cfg.bits),
        "task": cfg.task.name,
        "data": cfg.data.name,
        "status": "running",
        "git_commit": git_commit(),
        "started": _now(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def run(cfg: DictConfig, run_dir: Path, progress: bool = True) -> dict:
    """Run one experiment; result.json is written (atomically) whatever happens after validation."""
    validate(cfg)
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
        result.update(params=cost.params, quantized_params=cost.quantized_params, macs=cost.macs,
                      storage_mb=round(cost.storage_mb, 4), est_runtime=round(cost.est_runtime, 4))

        t = time.perf_counter()
        upstream = quantize_upstream(cfg, upstream, run_dir, progress)
        # Evaluate exactly what the packed file stores: fp16 scales and fp16 non-quantized tensors.
        from qspeech.quant.export import round_to_storage_

        round_to_storage_(upstream)
        timings["quantize_s"] = time.perf_counter() - t

        from qspeech.tasks import run_task

        t = time.perf_counter()
        key = fingerprint(upstream, extra=json.dumps(OmegaConf.to_container(cfg.quant, resolve=True), sort_keys=True)
                          + f"|bits={cfg.bits}")
        metrics = run_task(cfg, upstream, run_dir, key, progress=progress)
        timings["task_s"] = time.perf_counter() - t
        result.update(metric=metrics.get("metric"), value=metrics.get("value"), metrics=metrics)

        if cfg.get("export", False):
            result.update(_export(cfg, upstream, run_dir))
        result["status"] = "ok"
    except QSpeechError as e:
        result.update(status="failed", error=str(e))
        raise
    except BaseException as e:  # KeyboardInterrupt included: the result says the run did not finish
        result.update(status="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        timings["wall_s"] = time.perf_counter() - t_start
        result.update(finished=_now(), timings={k: round(v, 3) for k, v in timings.items()})
        write_json_atomic(_result_path(run_dir, result), result)
    return result


def _result_path(run_dir: Path, result: dict) -> Path:
    """A failed rerun never replaces an earlier successful result of the same experiment."""
    path = run_dir / RESULT_FILE
    if result["status"] != "ok" and path.is_file():
        try:
            if json.loads(path.read_text()).get("status") == "ok":
                return run_dir / "result.last_failure.json"
        except (OSError, ValueError):
            pass
    return path


def quantize_upstream(cfg: DictConfig, upstream, run_dir: Path, progress: bool = True):
    """The upstream quantized as cfg.quant / cfg.bits say (QAT methods distil on the data's train audio)."""
    from qspeech.quant import prepare_quantized_upstream

    audio = None
    if int(cfg.bits) < 32 and cfg.quant.method in ("lsq", "bit"):  # QAT distils on the task's unlabeled audio
        from qspeech.data import load_split

        audio = [u.path for u in load_split(cfg.data, "train", cfg.cache_dir)]
    return prepare_quantized_upstream(upstream, cfg.quant, int(cfg.bits), audio, cfg.cache_dir,
                                      run_dir=run_dir, progress=progress)


def _export(cfg: DictConfig, upstream, run_dir: Path) -> dict:
    from qspeech.quant.export import export_packed

    path = export_packed(upstream, cfg.quant, int(cfg.bits), run_dir / "upstream.packed.safetensors")
    return {"packed_path": str(path), "packed_mb": round(path.stat().st_size / 1e6, 4)}
