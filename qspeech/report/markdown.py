"""The report as markdown: the results table per source (our runs, the paper's) with the failed runs listed
under it, the SUPERB-style table with its chance row, and the accounting beside the paper's estimates."""

from __future__ import annotations

import pandas as pd
from tabulate import tabulate

from qspeech.report.compare import num
from qspeech.report.rows import SMOKE_MAX_STEPS, mean_std
from qspeech.tasks.metrics import metric_unit

__all__ = ["CAPTION", "SUPERB_CAPTION", "render_costs", "render_markdown", "render_superb"]


def _fmt(v, digits=2):
    if v is None or v is pd.NA or (isinstance(v, float) and pd.isna(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _with_std(row, col: str) -> str:
    """`70.52 ± 2.18 (n=3)` for an aggregate of seeds, the plain value otherwise."""
    value, std, n = row[col], row.get(f"{col}_std"), row.get("n")
    text = _fmt(value)
    if text and num(std) is not None and num(n) is not None and int(n) > 1:
        text += f" ± {float(std):.2f} (n={int(n)})"
    return text


def _cell(row, col: str) -> str:
    if col in ("value", "cer"):
        return _with_std(row, col)
    if col == "rise_pct":
        return "" if num(row[col]) is None else f"{float(row[col]):+.1f} %"
    if col == "bits":
        return str(int(row[col]))
    return _fmt(row[col], 3 if col in ("est_runtime", "storage_vs_distil", "runtime_vs_distil") else 2)


SHOW = ["model", "init", "quant", "bits", "task", "data", "overrides", "seeds", "flags", "status", "metric", "value",
        "rise_pct", "cer", "eval_data", "eval_value", "eval_cer", "skipped_audio", "storage_mb", "packed_mb",
        "est_runtime", "runtime_vs_teacher", "measured_speedup", "measured_vs_ort", "storage_vs_distil",
        "runtime_vs_distil", "metric_vs_distil"]
ALWAYS = {"model", "quant", "bits", "task", "data", "status", "metric", "value"}

CAPTION = (
    "Storage MB: quantized weights x bits + scales at 16 bits + all other parameters at 16 bits (/8/1e6). "
    "Est. runtime: MAC-weighted weight bits / 32, relative to the model's own full-precision MACs; "
    "runtime_vs_teacher: the same MAC-weighted cost relative to the full-precision teacher (HuBERT / tiny_hubert), "
    "the scale of the paper's DistilHuBERT 0.73. *_vs_distil: ratio to (metric: difference from) the DistilHuBERT "
    "row of the same task, data and recipe (tiny_distilhubert for tiny models). overrides: the config values that "
    "tell a row apart from the other runs of the same model/quant/bits/task/data (derived from the recorded "
    "configs); runs that differ only by seed are one row, value mean ± sample std (n runs, seeds listed); "
    "rise_pct: relative rise of the metric (means) over the full-precision row of the same model, task, data and "
    "recipe. flags: *random init* (no pretrained weights), *smoke* (experiment=smoke or under "
    f"{SMOKE_MAX_STEPS} training steps: a check run, not a result)."
)


def render_markdown(table: pd.DataFrame, problems: list[str], pending: list[tuple[str, str, str]] = ()) -> str:
    """The results table, one section per source, failed runs listed under ours, then the runs without a result
    yet (running, or stopped before writing one: a sweep still going); skipped files last."""
    lines = ["# qspeech results", "", CAPTION, ""]
    for source, part in table.groupby("source", sort=False):
        lines += [f"## {'Our runs' if source == 'qspeech' else source}", ""]
        records = part.to_dict("records")
        cells = {c: [_cell(r, c) for r in records] for c in SHOW}
        show = [c for c in SHOW if c in ALWAYS or any(cells[c])]  # columns empty in this section are left out
        lines += [tabulate(list(zip(*(cells[c] for c in show))), headers=show, tablefmt="github",
                          disable_numparse=True), ""]
        unfinished = [r for r in records if r["status"] not in ("ok", "published")]
        for r in unfinished:
            what = " ".join(str(x) for x in (r["model"], r["quant"], f"{int(r['bits'])}-bit", r["task"], r["data"],
                                             r["overrides"]) if x)
            seed = f", seed {r['seeds']}" if _fmt(r["seeds"]) else ""
            lines.append(f"- {r['status']}: {what}{seed}: {_fmt(r['error']) or 'no error recorded'} ({r['run_dir']})")
        if unfinished:
            lines.append("")
    if pending:
        lines += ["## Runs without a result yet", ""]
        lines += [f"- {state}: {folder} ({holder}" + ("" if state == "running" else
                  "; it stopped without writing a result: rerun its command to resume") + ")"
                  for folder, state, holder in pending] + [""]
    if problems:
        lines += ["## Skipped result files", ""] + [f"- {p}" for p in problems] + [""]
    return "\n".join(lines)


SUPERB_CAPTION = (
    "One column per task: its test metric in percent (↑ higher is better, ↓ lower is better), mean ± sample std "
    "over seeds where there are several; rows per upstream x quantizer x bits (quantized modules in brackets). "
    "Storage MB and est. runtime as above (runtime vs teacher: relative to the full-precision teacher's MACs). "
    "chance: the test accuracy of always answering the training split's most frequent class. Failed runs are "
    "listed under the main table."
)


def render_superb(sup: pd.DataFrame) -> str:
    """The SUPERB-style table as a markdown section, with a chance row for the classification tasks."""
    tasks = [c[: -len(".status")] for c in sup.columns if c.endswith(".status")]
    heads, chance = [], []
    for t in tasks:
        metrics = sup[f"{t}.metric"].dropna()
        metric = str(metrics.iloc[0]) if len(metrics) else None
        unit = metric_unit(metric) if metric else ""
        hib = sup[f"{t}.higher_is_better"].dropna()
        arrow = "" if not len(hib) else (" ↑" if bool(hib.iloc[0]) else " ↓")
        heads.append(f"{t} {(metric or 'metric').upper()}{f' {unit}' if unit else ''}{arrow}")
        chance.append(_fmt(mean_std(list(sup[f"{t}.chance"]))[0]))
    extra = [c for c in ("overrides", "flags") if sup[c].astype(str).str.len().any()]
    body = []
    for _, r in sup.iterrows():
        upstream = r["model"] if r["init"] == "pretrained" else f"{r['model']} ({r['init']} init)"
        cells = [upstream, r["quant"], str(int(r["bits"]))] + [str(r[c]) for c in extra] + [
            _fmt(r["storage_mb"]), _fmt(r["est_runtime"], 3), _fmt(r["runtime_vs_teacher"], 3)]
        for t in tasks:
            status = r[f"{t}.status"]
            if status == "ok":
                cells.append(_with_std({"value": r[f"{t}.value"], "value_std": r[f"{t}.value_std"],
                                        "n": r[f"{t}.n"]}, "value"))
            else:
                cells.append("" if pd.isna(status) else str(status))
        body.append(cells)
    if any(chance):
        body.append(["chance (majority class)", "", ""] + [""] * len(extra) + ["", "", ""] + chance)
    headers = ["upstream", "quant", "bits", *extra, "storage MB", "est. runtime", "runtime vs teacher", *heads]
    keep = [i for i, h in enumerate(headers) if h not in ("est. runtime", "runtime vs teacher")
            or any(row[i] for row in body)]  # runtime vs teacher needs the runs' MAC counts
    body = [[row[i] for i in keep] for row in body]
    return "\n".join(["## SUPERB tasks: our runs, one column per task", "", SUPERB_CAPTION, "",
                      tabulate(body, headers=[headers[i] for i in keep], tablefmt="github", disable_numparse=True),
                      ""])




def render_costs(costs: pd.DataFrame) -> str:
    """The `qspeech cost` runs beside the paper's estimates (qspeech.report.tables.cost_table)."""
    return ("\n## Accounting (`qspeech cost`) beside the paper's estimates\n\n"
            + tabulate(costs.fillna("").values.tolist(), headers=list(costs.columns), tablefmt="github") + "\n")
