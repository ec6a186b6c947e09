"""The results table: every run's result.json -> outputs/results.csv, outputs/report.md, outputs/report.png,
with the paper's published rows beside ours and the DistilHuBERT comparison the paper makes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qspeech import paper
from qspeech.atomic import write_text_atomic
from qspeech.results import COST_FILE, RunResult, collect, load_results

BENCH_FILE = "bench.json"
VARIANT_FOR_BITS = {32: "torch_fp32", 8: "int8_w8a8", 4: "nbits_4bit", 3: "nbits_3bit", 2: "nbits_2bit",
                    1: "nbits_1bit"}

KEY = ["model", "init", "quant", "bits", "task", "data"]
COLUMNS = KEY + [
    "source", "status", "metric", "value", "dev_value", "cer", "storage_mb", "packed_mb", "est_runtime",
    "measured_speedup", "measured_vs_ort", "params", "quantized_params", "macs", "runtime_vs_teacher", "storage_vs_distil",
    "runtime_vs_distil", "metric_vs_distil", "error", "run_dir",
]
DISTIL_OF = {"tiny_hubert": "tiny_distilhubert", "tiny_distilhubert": "tiny_distilhubert"}
# est_runtime is relative to the model's own full-precision MACs (the convention); the paper's
# DistilHuBERT runtime (0.73) is relative to HuBERT, so runtimes are also shown against the teacher.
TEACHER_OF = {"tiny_hubert": "tiny_hubert", "tiny_distilhubert": "tiny_hubert", "distilhubert": "hubert"}


def _quant_label(r: RunResult) -> str:
    if r.bits >= 32:
        return "fp"
    label = r.quant or "?"
    targets = r.targets or ["linear"]
    if list(targets) != ["linear"]:
        label += "[" + "+".join(targets) + "]"
    return label


def _row(r: RunResult) -> dict:
    m = r.metrics
    return {
        "model": r.model,
        "init": r.init,
        "quant": _quant_label(r),
        "bits": r.bits,
        "task": r.task,
        "data": r.data,
        "source": "qspeech",
        "status": r.status,
        "metric": r.metric,
        "value": r.value,
        "dev_value": m and m.dev_value,
        "cer": m and m.cer,
        "storage_mb": r.storage_mb,
        "packed_mb": r.packed_mb,
        "est_runtime": r.est_runtime,
        "measured_speedup": None,  # from `qspeech bench` runs: add_measured_speed
        "params": r.params,
        "quantized_params": r.quantized_params,
        "macs": r.macs,
        "error": r.error,
        "run_dir": r.run_dir,
        "_finished": r.finished or "",
    }


def build_table(results: list[RunResult]) -> pd.DataFrame:
    """One row per (model, init, quant, bits, task, data): the latest successful run, else the latest
    failure (a failed run is shown as failed, never dropped); then the paper's rows."""
    ours = pd.DataFrame([_row(r) for r in results], columns=COLUMNS + ["_finished"])
    if not ours.empty:
        ours["_ok"] = ours["status"].eq("ok")
        ours = ours.sort_values(["_ok", "_finished"]).groupby(KEY, dropna=False, sort=False).tail(1)
        ours = ours.drop(columns=["_ok"])
    pub = pd.DataFrame([{**p, "init": "pretrained", "data": "librispeech", "source": paper.SOURCE,
                         "status": "published"} for p in paper.ROWS])
    table = pd.concat([ours.drop(columns=["_finished"]), pub], ignore_index=True)[COLUMNS]
    table = _vs_distil(table)
    return table.sort_values(["source", "task", "data", "model", "init", "bits", "quant"],
                             ascending=[False, True, True, True, True, False, True], ignore_index=True)


def add_measured_speed(table: pd.DataFrame, benches: list[dict]) -> pd.DataFrame:
    """Measured speed-ups from `qspeech bench` runs (the latest per model and quant method) beside the
    estimate: the kernel that runs each bit-width (int8 W8A8, MatMulNBits 4/2 bits, 1 bit as 2-bit codes)."""
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
        variant = (bench or {}).get("variants", {}).get(VARIANT_FOR_BITS.get(int(row["bits"]), ""))
        if variant and variant.get("measured_speedup"):
            table.at[idx, "measured_speedup"] = round(float(variant["measured_speedup"]["vs_torch_fp32"]), 2)
            vs_ort = variant["measured_speedup"].get("vs_ort_fp32")
            table.at[idx, "measured_vs_ort"] = None if vs_ort is None else round(float(vs_ort), 2)
    return table


def _vs_distil(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's comparison: storage and runtime as a ratio to DistilHuBERT's, metric as a difference."""
    table = table.copy()
    for col in ("storage_vs_distil", "runtime_vs_distil", "metric_vs_distil", "runtime_vs_teacher"):
        table[col] = pd.NA
    macs_of = {m: g for m, g in table[table["macs"].notna()].groupby("model")["macs"].max().items()}
    weighted = {}  # MAC-weighted runtime in MACs: comparable across models of one family
    for idx, row in table.iterrows():
        if pd.notna(row["macs"]) and pd.notna(row["est_runtime"]):
            weighted[idx] = float(row["est_runtime"]) * float(row["macs"])
            teacher = macs_of.get(TEACHER_OF.get(row["model"], row["model"]))
            if teacher:
                table.at[idx, "runtime_vs_teacher"] = round(weighted[idx] / float(teacher), 3)
        elif pd.notna(row["est_runtime"]) and row["source"] != "qspeech":
            table.at[idx, "runtime_vs_teacher"] = row["est_runtime"]  # the paper's are relative to HuBERT
    for idx, row in table.iterrows():
        ref_model = DISTIL_OF.get(row["model"], "distilhubert")
        ref = table[(table["model"] == ref_model) & (table["bits"] == 32) & (table["task"] == row["task"])
                    & (table["data"] == row["data"]) & (table["source"] == row["source"])
                    & (table["init"] == "pretrained") & table["status"].isin(["ok", "published"])]
        if ref.empty:
            continue
        ref = ref.iloc[0]
        if pd.notna(row["storage_mb"]) and pd.notna(ref["storage_mb"]):
            table.at[idx, "storage_vs_distil"] = round(float(row["storage_mb"]) / float(ref["storage_mb"]), 3)
        if idx in weighted and ref.name in weighted:
            table.at[idx, "runtime_vs_distil"] = round(weighted[idx] / weighted[ref.name], 3)
        elif row["source"] != "qspeech" and pd.notna(row["est_runtime"]) and pd.notna(ref["est_runtime"]):
            table.at[idx, "runtime_vs_distil"] = round(float(row["est_runtime"]) / float(ref["est_runtime"]), 3)
        if pd.notna(row["value"]) and pd.notna(ref["value"]):
            table.at[idx, "metric_vs_distil"] = round(float(row["value"]) - float(ref["value"]), 2)
    return table


def _fmt(v, digits=2):
    if v is None or (isinstance(v, float) and pd.isna(v)) or v is pd.NA:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_markdown(table: pd.DataFrame, problems: list[str]) -> str:
    from tabulate import tabulate

    show = ["model", "init", "quant", "bits", "task", "data", "status", "metric", "value", "cer", "storage_mb",
            "packed_mb", "est_runtime", "runtime_vs_teacher", "measured_speedup", "measured_vs_ort", "storage_vs_distil",
            "runtime_vs_distil", "metric_vs_distil"]
    lines = ["# qspeech results", ""]
    lines += ["Storage MB: quantized weights x bits + scales at 16 bits + all other parameters at 16 bits "
              "(/8/1e6). Est. runtime: MAC-weighted weight bits / 32, relative to the model's own full-precision "
              "MACs; runtime_vs_teacher: the same MAC-weighted cost relative to the full-precision teacher "
              "(HuBERT / tiny_hubert), the scale of the paper's DistilHuBERT 0.73. *_vs_distil: ratio to "
              "(metric: difference from) the DistilHuBERT row of the same task and data (tiny_distilhubert for "
              "tiny models).", ""]
    for source, part in table.groupby("source", sort=False):
        lines += [f"## {'Our runs' if source == 'qspeech' else source}", ""]
        rows = [[_fmt(v, 3 if c in ("est_runtime", "storage_vs_distil", "runtime_vs_distil") else 2)
                 for c, v in zip(show, r)] for r in part[show].itertuples(index=False)]
        lines += [tabulate(rows, headers=show, tablefmt="github"), ""]
        failed = part[part["status"] == "failed"]
        for r in failed.itertuples(index=False):
            lines.append(f"- failed: {r.model} {r.quant} {r.bits}-bit {r.task}: {r.error}")
        if not failed.empty:
            lines.append("")
    if problems:
        lines += ["## Skipped result files", ""] + [f"- {p}" for p in problems] + [""]
    return "\n".join(lines)


def plot(table: pd.DataFrame, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[table["status"].isin(["ok", "published"]) & table["value"].notna()]
    if ok.empty:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    panels = [("qspeech", "Our runs"), (paper.SOURCE, "Published (Yeh et al. 2023)")]
    for row_i, (source, title) in enumerate(panels):
        part = ok[ok["source"] == source]
        part = part.assign(runtime_vs_teacher=part["runtime_vs_teacher"].fillna(part["est_runtime"]))
        axes_spec = [("storage_mb", "storage (MB)"),
                     ("runtime_vs_teacher", "est. runtime (relative to the full-precision teacher)")]
        for col_i, (x, xlabel) in enumerate(axes_spec):
            ax = axes[row_i][col_i]
            for (model, init, quant), grp in part.groupby(["model", "init", "quant"], sort=False):
                grp = grp.sort_values("bits")
                if (grp["storage_mb"].astype(float) == 0).all():  # FBANK: no weights, no upstream cost
                    ax.axhline(float(grp["value"].iloc[0]), linestyle="--", color="gray", linewidth=1,
                               label=f"{model} (no upstream)")
                    continue
                own = grp
                if quant != "fp":  # each quantizer's curve starts at its full-precision point
                    fp = part[(part["model"] == model) & (part["init"] == init) & (part["quant"] == "fp")]
                    grp = pd.concat([grp, fp.head(1)])
                is_distil = "distil" in str(model)
                label = f"{model}{'' if init == 'pretrained' else ' (' + init + ')'} {quant}"
                ax.plot(grp[x].astype(float), grp["value"].astype(float), marker="*" if is_distil else "o",
                        markersize=14 if is_distil else 6, linestyle="" if is_distil else "-", label=label)
                for _, r in own.iterrows():
                    ax.annotate(f"{int(r['bits'])}b", (float(r[x]), float(r["value"])), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(str(part["metric"].dropna().iloc[0]).upper() if not part.empty else "metric")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            if col_i == 1 and not part.empty:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
        round(r["est_runtime"] * r["_macs"] / t, 3) if (t := teacher_macs.get((TEACHER_OF.get(r["model"], r["model"]),
                                                                               r["_seconds"]))) else None
        for _, r in df.iterrows()])
    df = df.drop(columns=["_mtime", "_macs", "_seconds"])
    return df.sort_values(["model", "targets", "bits"], ascending=[True, True, False])


def make_report(outputs: str | Path = "outputs") -> dict:
    from tabulate import tabulate

    outputs = Path(outputs)
    results, problems = load_results(outputs)
    costs, _ = collect(outputs, COST_FILE, frozenset({"model", "bits", "storage_mb", "est_runtime"}))
    benches, _ = collect(outputs, BENCH_FILE, frozenset({"model", "variants"}))
    table = add_measured_speed(build_table(results), benches)
    costs_df = cost_table(costs)
    outputs.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = outputs / "results.csv", outputs / "report.md", outputs / "report.png"
    write_text_atomic(csv_path, table.to_csv(index=False))
    markdown = render_markdown(table, problems)
    if not costs_df.empty:
        markdown += ("\n## Accounting (`qspeech cost`) beside the paper's estimates\n\n"
                     + tabulate(costs_df.fillna("").values.tolist(), headers=list(costs_df.columns), tablefmt="github")
                     + "\n")
    write_text_atomic(md_path, markdown)
    png = plot(table, png_path)
    return {"csv": csv_path, "markdown": md_path, "plot": png, "runs": len(results), "problems": problems,
            "table": table}
