"""The results table's rows: every run's result.json as a row (labelled by the config values that set it apart
from the runs of the same model/init/quant/bits/task/data), the runs of one experiment that differ only by seed
aggregated into one, the paper's published rows beside ours, and the paper's comparisons added."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from qspeech import paper
from qspeech.report.compare import add_rise, add_vs_distil, has_prefix
from qspeech.report.experiments import SEED_KEY, flat_config
from qspeech.results import RunResult
from qspeech.tasks.metrics import higher_is_better

__all__ = ["COLUMNS", "KEY", "SMOKE_MAX_STEPS", "build_table", "mean_std"]

KEY = ["model", "init", "quant", "bits", "task", "data"]
COLUMNS = KEY + [
    "overrides", "seeds", "n", "flags", "source", "status", "metric", "higher_is_better", "value", "value_std",
    "rise_pct", "majority_acc", "dev_value", "cer", "cer_std", "eval_data", "eval_value", "eval_cer", "skipped_audio",
    "storage_mb", "packed_mb", "est_runtime", "measured_speedup", "measured_vs_ort", "params", "quantized_params",
    "macs", "runtime_vs_teacher", "storage_vs_distil", "runtime_vs_distil", "metric_vs_distil", "error", "run_dir",
]
SMOKE_MAX_STEPS = 50  # fewer training steps than this: a check run whose numbers mean nothing


def _quant_label(r: RunResult) -> str:
    if r.bits >= 32:
        return "fp"
    label = r.quant or "?"
    targets = r.targets or ["linear"]
    if list(targets) != ["linear"]:
        label += "[" + "+".join(targets) + "]"
    return label


def _override_value(v: str) -> str:
    """A recorded value as one writes it on the command line: task.lr=0.001, model.ckpt=null, x=[a,b]."""
    value = json.loads(v)
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else json.dumps(value)


def _smoke(r: RunResult) -> bool:
    """experiment=smoke on the run's command line (Hydra's .hydra/overrides.yaml), or too few steps."""
    steps = (r.config.get("train") or {}).get("max_steps")
    if isinstance(steps, int) and steps < SMOKE_MAX_STEPS:
        return True
    overrides = Path(r.run_dir or ".") / ".hydra" / "overrides.yaml"
    try:
        return "experiment=smoke" in overrides.read_text().split()
    except OSError:
        return False


def _better_higher(metric: str | None, recorded: bool | None) -> bool | None:
    """Whether a larger value is better: as the run recorded it, else as the metric's name says."""
    if recorded is not None:
        return bool(recorded)
    return None if metric is None else higher_is_better(metric)


def _row(r: RunResult) -> dict:
    m = r.metrics
    flags = [f for f, on in (("random init", r.init == "random"), ("smoke", _smoke(r))) if on]
    return {
        "model": r.model,
        "init": r.init,
        "quant": _quant_label(r),
        "bits": r.bits,
        "task": r.task,
        "data": r.data,
        "seeds": r.config.get(SEED_KEY),
        "flags": ", ".join(flags),
        "source": "qspeech",
        "status": r.status,
        "metric": r.metric,
        "higher_is_better": _better_higher(r.metric, m and m.higher_is_better),
        "value": r.value,
        "majority_acc": m and m.majority_acc,  # classification: the chance line (train's majority class)
        "dev_value": m and m.dev_value,
        "cer": m and m.cer,
        # the head scored on a second data set (eval_data=...), in the task's metric
        "eval_data": ((m and m.eval) or {}).get("data"),
        "eval_value": ((m and m.eval) or {}).get(r.metric),
        "eval_cer": ((m and m.eval) or {}).get("cer"),
        "skipped_audio": (m and m.skipped_audio) or None,  # shown only where some audio was unreadable
        "storage_mb": r.storage_mb,
        "packed_mb": r.packed_mb,
        "est_runtime": r.est_runtime,
        "params": r.params,
        "quantized_params": r.quantized_params,
        "macs": r.macs,
        "error": r.error,
        "run_dir": r.run_dir,
        "_config": flat_config(r.config),
        "_finished": r.finished or "",
    }


def _distinguishing(rows: list[dict]) -> dict[str, list[str]]:
    """Per identity (KEY) group, the config keys whose recorded values differ between its runs (the seed
    and, at full precision, the unused quantizer settings aside): what a sweep varied."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in KEY), []).append(row)
    varying: dict[tuple, list[str]] = {}
    for key, members in groups.items():
        values: dict[str, set] = {}
        for row in members:
            for k, v in row["_config"].items():
                values.setdefault(k, set()).add(v)
        skip = ("quant",) if key[KEY.index("bits")] >= 32 else ()
        varying[key] = sorted(k for k, vs in values.items()
                              if len(vs) > 1 and k != SEED_KEY and not has_prefix(k, skip))
    return varying


def _label_overrides(rows: list[dict]) -> None:
    varying = _distinguishing(rows)
    for row in rows:
        keys = varying[tuple(row[k] for k in KEY)]
        cfg = row["_config"]
        row["overrides"] = " ".join(f"{k}={_override_value(cfg[k])}" for k in keys if k in cfg)


def mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and not pd.isna(v)]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else None
    return mean, std


def _aggregate(members: list[dict]) -> dict:
    """Successful runs of one experiment that differ only by seed -> one row: means, sample std, n, seeds."""
    members = sorted(members, key=lambda r: (str(r["seeds"]), r["_finished"]))
    out = dict(members[-1])
    out["n"] = len(members)
    seeds = [r["seeds"] for r in members if r["seeds"] is not None]
    out["seeds"] = ",".join(str(s) for s in dict.fromkeys(seeds))
    out["run_dir"] = ";".join(str(r["run_dir"]) for r in members)
    for col in ("value", "cer"):
        out[col], out[f"{col}_std"] = mean_std([r[col] for r in members])
    for col in ("dev_value", "eval_value", "eval_cer", "storage_mb", "packed_mb", "est_runtime", "majority_acc"):
        out[col] = mean_std([r[col] for r in members])[0]
    return out


def _paper_rows() -> list[dict]:
    return [{**p, "init": "pretrained", "data": "librispeech", "source": paper.SOURCE, "status": "published",
             "higher_is_better": _better_higher(p["metric"], None), "overrides": "", "flags": "", "n": 1,
             "_config": {}} for p in paper.ROWS]


def build_table(results: list[RunResult]) -> pd.DataFrame:
    """Every run is kept: one row per distinct experiment, labelled by the config overrides that tell it
    apart from the runs of the same model/init/quant/bits/task/data; successful runs that differ only by
    seed become one row (mean, std, n, seeds); each failed or unfinished run is a row of its own with its
    error. Then the paper's rows; the rise over full precision and the DistilHuBERT comparison."""
    rows = [_row(r) for r in results]
    _label_overrides(rows)
    ours, experiments = [], {}
    for row in rows:
        if row["status"] == "ok":
            experiments.setdefault(tuple(row[k] for k in KEY) + (row["overrides"],), []).append(row)
        else:
            ours.append(row | {"n": 1})
    ours += [_aggregate(members) for members in experiments.values()]
    all_rows = ours + _paper_rows()
    add_rise(all_rows)
    add_vs_distil(all_rows)
    order = ["source", "task", "data", "model", "init", "bits", "quant", "overrides", "status"]
    return pd.DataFrame(all_rows, columns=COLUMNS).sort_values(
        order, ascending=[False, True, True, True, True, False, True, True, False], ignore_index=True,
        key=lambda c: c.fillna("") if c.dtype == object else c)


