"""The report's tables as data frames: the SUPERB-style table (one column per task) of our runs, and the
`qspeech cost` runs beside the paper's storage and runtime estimates."""

from __future__ import annotations

import pandas as pd

from qspeech import paper
from qspeech.report.compare import num

__all__ = ["ROW_KEY", "SUPERB_ORDER", "cost_table", "superb_table", "task_columns"]

# SUPERB's column order (Yang et al. 2021, Table 2: PR, KS, IC, SID, ..., ASR); other tasks follow by name.
SUPERB_ORDER = ("pr", "ks", "ic", "sid", "asr")
ROW_KEY = ["model", "init", "quant", "bits", "overrides", "flags"]


def _task_order(task: str) -> tuple:
    kind = str(task).split("_")[0]
    return (SUPERB_ORDER.index(kind) if kind in SUPERB_ORDER else len(SUPERB_ORDER), str(task))


def task_columns(ours: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(column name, task, data) per task of our runs, in SUPERB's order; a task run on several data sets
    gets a column per data set, named `task (data)`."""
    pairs = sorted({(t, d) for t, d in zip(ours["task"], ours["data"])}, key=lambda p: (_task_order(p[0]), p[1]))
    many = {t for t, _ in pairs if sum(1 for u, _ in pairs if u == t) > 1}
    return [(f"{t} ({d})" if t in many else t, t, d) for t, d in pairs]


def superb_table(table: pd.DataFrame) -> pd.DataFrame:
    """Our runs as SUPERB reports them: one row per upstream x quantizer x bits (and the overrides and flags
    that set a row apart), one column per task with its test metric (`<task>.value`, `.value_std`, `.n`,
    `.metric`, `.higher_is_better`, `.chance`, or `.status` where the task has only failed runs), storage and
    estimated runtime beside. Empty when our runs cover one ASR task only: the main table is that table."""
    ours = table[table["source"] == "qspeech"].copy()
    ours[["overrides", "flags"]] = ours[["overrides", "flags"]].fillna("")
    if ours.empty or (ours["task"].nunique() == 1 and set(ours["metric"].dropna()) <= {"wer"}):
        return pd.DataFrame()
    columns = task_columns(ours)
    rows: dict[tuple, dict] = {}
    for _, r in ours.iterrows():
        row = rows.setdefault(tuple(r[k] for k in ROW_KEY), {k: r[k] for k in ROW_KEY})
        name = next(c for c, t, d in columns if (t, d) == (r["task"], r["data"]))
        if r["status"] != "ok":
            row.setdefault(f"{name}.status", r["status"])  # shown only where the task has no finished run
            continue
        for col in ("storage_mb", "est_runtime", "runtime_vs_teacher"):
            if num(row.get(col)) is None:  # the upstream's cost: the same for every task it ran
                row[col] = r[col]
        row |= {f"{name}.{k}": r[v] for k, v in (("metric", "metric"), ("higher_is_better", "higher_is_better"),
                                                  ("value", "value"), ("value_std", "value_std"), ("n", "n"),
                                                  ("chance", "majority_acc"))}
        row[f"{name}.status"] = "ok"

    def order(row: dict) -> tuple:  # the teachers and their quantized versions, then the students, then FBANK
        no_upstream = num(row.get("storage_mb")) == 0.0
        return (no_upstream, paper.is_student(str(row["model"])), str(row["model"]), row["init"] != "pretrained",
                str(row["init"]), -int(row["bits"]), row["quant"] != "fp", str(row["quant"]), str(row["overrides"]),
                str(row["flags"]))

    cols = ROW_KEY + ["storage_mb", "est_runtime", "runtime_vs_teacher"] + [
        f"{c}.{k}" for c, _, _ in columns
        for k in ("metric", "higher_is_better", "value", "value_std", "n", "chance", "status")]
    return pd.DataFrame(sorted(rows.values(), key=order), columns=cols)


def cost_table(costs: list[dict]) -> pd.DataFrame:
    """`qspeech cost` runs (the latest per model/quant/targets/bits) beside the paper's storage and runtime
    for the same model and bits: the accounting checked against the published estimates."""
    rows = []
    for c in costs:
        bits = int(c["bits"])
        pub = next((p for p in paper.ROWS if p["model"] == c["model"] and p["bits"] == bits), None)
        rows.append({
            "_macs": c.get("macs"), "_seconds": c.get("seconds"),
            "model": c["model"], "quant": "fp" if bits >= 32 else c.get("quant"),
            "targets": "+".join(c.get("targets") or ["linear"]), "bits": bits, "params": c.get("params"),
            "quantized_params": c.get("quantized_params"), "storage_mb": round(float(c["storage_mb"]), 2),
            "paper_storage_mb": pub and pub["storage_mb"], "est_runtime": round(float(c["est_runtime"]), 3),
            "paper_est_runtime": pub and pub["est_runtime"], "_mtime": c.get("_mtime", 0),
        })
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows).sort_values("_mtime").drop_duplicates(["model", "quant", "targets", "bits"], keep="last")
    teacher_macs = {(r["model"], r["_seconds"]): r["_macs"] for _, r in df.iterrows() if r["_macs"]}
    df.insert(df.columns.get_loc("paper_est_runtime"), "runtime_vs_teacher", [
        round(r["est_runtime"] * r["_macs"] / t, 3)
        if (t := teacher_macs.get((paper.teacher_of(r["model"]), r["_seconds"]))) else None
        for _, r in df.iterrows()])
    df = df.drop(columns=["_mtime", "_macs", "_seconds"])
    return df.sort_values(["model", "targets", "bits"], ascending=[True, True, False])


