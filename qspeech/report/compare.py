"""The comparisons the paper makes, added to the rows of the results table: the rise of the metric over full
precision, storage and runtime against the distilled student (DistilHuBERT) and the full-precision teacher
(qspeech.paper declares which model is whose), and measured speed-ups from `qspeech bench` runs."""

from __future__ import annotations

import json

import pandas as pd

from qspeech import paper
from qspeech.report.experiments import SEED_KEY

__all__ = ["add_measured_speed", "add_rise", "add_vs_distil", "fastest_variant", "has_prefix", "num"]


def num(v) -> float | None:
    return None if v is None or pd.isna(v) else float(v)


def has_prefix(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _config_signature(row: dict, drop: tuple[str, ...]) -> str | None:
    """The run's config without `drop` (and the seed): two rows with equal signatures ran the same
    recipe. None for rows without a recorded config (the paper's, older result files)."""
    cfg = row.get("_config")
    if not cfg:
        return None
    return json.dumps({k: v for k, v in cfg.items() if k != SEED_KEY and not has_prefix(k, drop)}, sort_keys=True)


def _reference(row: dict, candidates: list[dict], drop: tuple[str, ...]) -> dict | None:
    """The candidate run with the same recipe as `row` (all but `drop`); where no config was recorded, the
    only candidate. None when no candidate is comparable."""
    sig = _config_signature(row, drop)
    same = [c for c in candidates if _config_signature(c, drop) == sig] if sig else []
    if len(same) == 1:
        return same[0]
    if len(candidates) == 1 and (sig is None or _config_signature(candidates[0], drop) is None):
        return candidates[0]
    return None


def add_rise(rows: list[dict]) -> None:
    """rise_pct: the relative rise of the metric (from means) over the full-precision row of the same model,
    init, task, data and recipe, as the paper's 7.06 -> 12.68 WER (+80 %)."""
    same = lambda a, b: all(a[k] == b[k] for k in ("source", "model", "init", "task", "data"))  # noqa: E731
    fps = [r for r in rows if r["bits"] >= 32 and r["status"] in ("ok", "published") and r["value"] is not None]
    for row in rows:
        if row["bits"] >= 32 or row["value"] is None or pd.isna(row["value"]):
            continue
        ref = _reference(row, [f for f in fps if same(row, f)], ("bits", "quant"))
        if ref is not None and ref["value"]:
            row["rise_pct"] = round(100.0 * (float(row["value"]) - float(ref["value"])) / float(ref["value"]), 1)


def _add_vs_teacher(rows: list[dict]) -> dict[int, float]:
    """runtime_vs_teacher of every row; returns each row's MAC-weighted runtime in MACs (comparable across
    the models of one family) by row index."""
    macs_of: dict[str, float] = {}
    for row in rows:
        if num(row.get("macs")) is not None:
            macs_of[row["model"]] = max(macs_of.get(row["model"], 0.0), float(row["macs"]))
    weighted = {}
    for i, row in enumerate(rows):
        macs, est = num(row.get("macs")), num(row.get("est_runtime"))
        if macs is not None and est is not None:
            weighted[i] = est * macs
            teacher = macs_of.get(paper.teacher_of(row["model"]))
            if teacher:
                row["runtime_vs_teacher"] = round(weighted[i] / teacher, 3)
        elif est is not None and row["source"] != "qspeech":
            row["runtime_vs_teacher"] = est  # the paper's are relative to HuBERT
    return weighted


def add_vs_distil(rows: list[dict]) -> None:
    """The paper's comparison: storage and runtime as a ratio to the distilled student's, metric as a
    difference, against the student's full-precision run of the same task, data and recipe."""
    weighted = _add_vs_teacher(rows)
    for i, row in enumerate(rows):
        ref_model = paper.student_of(row["model"])
        candidates = [j for j, c in enumerate(rows) if c["model"] == ref_model and c["bits"] >= 32
                      and all(c[k] == row[k] for k in ("task", "data", "source")) and c["init"] == "pretrained"
                      and c["status"] in ("ok", "published")]
        ref = _reference(row, [rows[j] for j in candidates], ("bits", "quant", "model"))
        if ref is None:
            continue
        j = next(j for j in candidates if rows[j] is ref)
        storage, ref_storage = num(row.get("storage_mb")), num(ref.get("storage_mb"))
        if storage is not None and ref_storage:
            row["storage_vs_distil"] = round(storage / ref_storage, 3)
        if i in weighted and j in weighted:
            row["runtime_vs_distil"] = round(weighted[i] / weighted[j], 3)
        elif row["source"] != "qspeech" and num(row.get("est_runtime")) is not None and num(ref.get("est_runtime")):
            row["runtime_vs_distil"] = round(float(row["est_runtime"]) / float(ref["est_runtime"]), 3)
        if num(row.get("value")) is not None and num(ref.get("value")) is not None:
            row["metric_vs_distil"] = round(float(row["value"]) - float(ref["value"]), 2)


def fastest_variant(variants: dict, bits: int) -> dict | None:
    """The bench variant that runs `bits`-bit weights fastest (torch_fp32 for bits >= 32)."""
    if bits >= 32:
        return variants.get("torch_fp32")
    timed = [v for v in variants.values() if v.get("bits") == bits and v.get("measured_speedup")]
    return max(timed, key=lambda v: v["measured_speedup"]["vs_torch_fp32"], default=None)


def add_measured_speed(table: pd.DataFrame, benches: list[dict]) -> pd.DataFrame:
    """Measured speed-ups from `qspeech bench` runs (the latest per model and quant method) beside the
    estimate: the fastest kernel measured for the row's bit-width (torch fp32 for full precision)."""
    table = table.copy()
    latest: dict[tuple, dict] = {}
    for b in sorted(benches, key=lambda b: b.get("_mtime", 0)):
        latest[(b.get("model"), (b.get("quant") or {}).get("method") if isinstance(b.get("quant"), dict)
                else b.get("quant"))] = b
    for idx, row in table.iterrows():
        if row["source"] != "qspeech":
            continue
        bench = latest.get((row["model"], str(row["quant"]).split("[")[0])) or (
            latest.get(next((k for k in latest if k[0] == row["model"]), None)) if row["bits"] >= 32 else None)
        variant = fastest_variant((bench or {}).get("variants", {}), int(row["bits"]))
        if variant and variant.get("measured_speedup"):
            table.at[idx, "measured_speedup"] = round(float(variant["measured_speedup"]["vs_torch_fp32"]), 2)
            vs_ort = variant["measured_speedup"].get("vs_ort_fp32")
            table.at[idx, "measured_vs_ort"] = None if vs_ort is None else round(float(vs_ort), 2)
    return table
