"""The report's plots: the metric against storage and against estimated runtime, per task and data set, for the
results table (our runs, then the paper's) and for the SUPERB table (with the chance line)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from qspeech import paper
from qspeech.atomic import atomic_path
from qspeech.report.compare import num
from qspeech.report.rows import mean_std
from qspeech.report.tables import task_columns
from qspeech.tasks.metrics import metric_unit

__all__ = ["plot", "plot_superb", "ylabel"]


def ylabel(part: pd.DataFrame) -> str:
    """The axis label of the rows' metric: its name and unit (qspeech.tasks.metrics.metric_unit)."""
    if not part["metric"].notna().any():
        return "metric"
    metric = str(part["metric"].dropna().iloc[0])
    unit = metric_unit(metric)
    return f"{metric.upper()} ({unit})" if unit else metric


def _series_name(model, init, quant, overrides, flags) -> str:
    notes = [f for f in str(flags or "").split(", ") if f and f != "random init"]
    name = f"{model}{'' if init == 'pretrained' else ' (' + init + ' init)'} {quant}"
    return " ".join(p for p in [name, str(overrides or "")] + [f"[{n}]" for n in notes] if p)


def _fp_point(part: pd.DataFrame, model, init, overrides) -> pd.DataFrame:
    """The full-precision row a quantizer's curve starts from: same model and init, the same overrides
    label if there is one, else the only full-precision row."""
    fp = part[(part["model"] == model) & (part["init"] == init) & (part["quant"] == "fp")]
    same = fp[fp["overrides"].fillna("") == (overrides or "")]
    return same.head(1) if not same.empty else fp if len(fp) == 1 else fp.head(0)


def _draw_panel(ax, part: pd.DataFrame, x: str) -> None:
    keys = ["model", "init", "quant", "overrides", "flags"]
    part = part.assign(**{k: part[k].fillna("") for k in ("overrides", "flags")})
    for (model, init, quant, overrides, flags), grp in part.groupby(keys, sort=False):
        if (grp["storage_mb"].astype(float) == 0).all():  # FBANK: no weights, no upstream cost
            ax.axhline(float(grp["value"].iloc[0]), linestyle="--", color="gray", linewidth=1,
                       label=f"{model} (no upstream)")
            continue
        is_distil = paper.is_student(str(model))
        if quant == "fp" and not is_distil:
            continue  # full-precision points are drawn last, on top of the curves that start at them
        own = grp.sort_values("bits")
        line = own if is_distil else pd.concat([own, _fp_point(part, model, init, overrides)])
        ax.errorbar(line[x].astype(float), line["value"].astype(float), yerr=line["value_std"].astype(float),
                    marker="*" if is_distil else "o", markersize=14 if is_distil else 6, capsize=2,
                    linestyle="" if is_distil else "-", label=_series_name(model, init, quant, overrides, flags))
        for _, r in own.iterrows():
            ax.annotate(f"{int(r['bits'])}b", (float(r[x]), float(r["value"])), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    fp = part[(part["quant"] == "fp") & ~part["model"].astype(str).map(paper.is_student)
              & (part["storage_mb"].astype(float) != 0)]
    for _, r in fp.iterrows():
        ax.errorbar([float(r[x])], [float(r["value"])], yerr=[num(r["value_std"]) or 0.0], marker="s",
                    markersize=8, markeredgecolor="black", capsize=2, zorder=5, linestyle="",
                    label=_series_name(r["model"], r["init"], "fp", r["overrides"], r["flags"]))
        ax.annotate("32b", (float(r[x]), float(r["value"])), fontsize=7, xytext=(3, 3), textcoords="offset points")


def _ok_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["status"].isin(["ok", "published"]) & table["value"].notna()]


def plot(table: pd.DataFrame, path: Path) -> Path | None:
    """WER against storage and against estimated runtime: one row of panels per task and data of our runs,
    then the paper's. Seed aggregates carry their std as error bars; full-precision points are squares
    drawn on top of the curves that start at them."""
    ok = _ok_rows(table)
    if ok.empty:
        return None
    panels = [(f"Our runs: task {t}, data {d}", part) for (t, d), part in
              ok[ok["source"] == "qspeech"].groupby(["task", "data"], sort=True)]
    pub = ok[ok["source"] == paper.SOURCE]
    panels += [(f"Published (Yeh et al. 2023): task {t}, data {d} (test-clean)", part)
               for (t, d), part in pub.groupby(["task", "data"], sort=True)]
    return _draw_figure(panels, path)


def plot_superb(table: pd.DataFrame, path: Path) -> Path | None:
    """The SUPERB table's plots: per task (SUPERB's order) its metric against storage and against estimated
    runtime, our runs only, with the chance line (majority class) of the classification tasks."""
    ok = _ok_rows(table)
    ours = ok[ok["source"] == "qspeech"]
    if ours.empty:
        return None
    panels = []
    for name, t, d in task_columns(ours):
        part = ours[(ours["task"] == t) & (ours["data"] == d)]
        hib = part["higher_is_better"].dropna()
        better = "" if hib.empty else f" ({'higher' if bool(hib.iloc[0]) else 'lower'} is better)"
        panels.append((f"task {t}, data {d}: {ylabel(part)}{better}", part))
    return _draw_figure(panels, path, chance=True)


def _draw_figure(panels: list[tuple[str, pd.DataFrame]], path: Path, chance: bool = False) -> Path:
    """One row of two panels (metric against storage, against runtime) per (title, rows)."""
    import matplotlib  # heavy, and needed only when there is something to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 2, figsize=(15, 4.2 * len(panels)), squeeze=False)
    axes_spec = [("storage_mb", "storage (MB)"),
                 ("runtime_vs_teacher", "est. runtime (relative to the full-precision teacher)")]
    for row_i, (title, part) in enumerate(panels):
        part = part.assign(runtime_vs_teacher=part["runtime_vs_teacher"].fillna(part["est_runtime"]))
        level = mean_std(list(part["majority_acc"]))[0] if chance else None
        for col_i, (x, xlabel) in enumerate(axes_spec):
            ax = axes[row_i][col_i]
            _draw_panel(ax, part, x)
            if level is not None:
                ax.axhline(level, linestyle=":", color="red", linewidth=1, label="chance (majority class)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel(part))
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.margins(x=0.08, y=0.08)  # points at the edges (100 % WER, full-precision storage) stay inside
            if col_i == 1:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a reader never sees half a picture
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


