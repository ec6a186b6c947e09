"""`qspeech report`: every run's result.json -> outputs/results.csv, outputs/report.md, outputs/report.png (and the
SUPERB-style superb.csv / superb.png when the runs cover several tasks), with the paper's published rows beside
ours and the DistilHuBERT comparison the paper makes.

rows.py builds the results table (experiments.py says which config keys set runs apart, compare.py adds the
paper's comparisons), tables.py the SUPERB and accounting tables, markdown.py and plots.py render them."""

from __future__ import annotations

import sys
from pathlib import Path

from qspeech.atomic import write_text_atomic
from qspeech.errors import QSpeechError
from qspeech.report.compare import add_measured_speed
from qspeech.report.markdown import render_costs, render_markdown, render_superb
from qspeech.report.plots import plot, plot_superb
from qspeech.report.rows import build_table
from qspeech.report.tables import cost_table, superb_table
from qspeech.results import COST_FILE, collect, load_results, runs_without_result

__all__ = ["BENCH_FILE", "build_table", "main", "make_report", "plot", "plot_superb", "superb_table"]

BENCH_FILE = "bench.json"


def _check_folder(outputs: Path) -> None:
    if not outputs.is_dir():  # a typo must not create a folder and report "0 runs"
        raise QSpeechError(f"--outputs {outputs}: no such folder; pass the folder your runs wrote into "
                           f"(default: outputs)")


def make_report(outputs: str | Path = "outputs") -> dict:
    """Write the report's files into `outputs`; returns their paths, the tables, the number of runs and the
    result files that could not be read (problems)."""
    outputs = Path(outputs)
    _check_folder(outputs)
    results, problems = load_results(outputs)
    costs, _ = collect(outputs, COST_FILE, frozenset({"model", "bits", "storage_mb", "est_runtime"}))
    benches, _ = collect(outputs, BENCH_FILE, frozenset({"model", "variants"}))
    table = add_measured_speed(build_table(results), benches)
    costs_df = cost_table(costs)
    csv_path, md_path, png_path = outputs / "results.csv", outputs / "report.md", outputs / "report.png"
    write_text_atomic(csv_path, table.to_csv(index=False))
    pending = runs_without_result(outputs)
    markdown = render_markdown(table, problems, pending)
    if not costs_df.empty:
        markdown += render_costs(costs_df)
    sup = superb_table(table)
    sup_csv = sup_png = None
    if not sup.empty:
        sup_csv, sup_png = outputs / "superb.csv", outputs / "superb.png"
        write_text_atomic(sup_csv, sup.to_csv(index=False))
        markdown += "\n" + render_superb(sup) + f"\nPlots: `{sup_png.name}` (per task, against storage and runtime).\n"
    write_text_atomic(md_path, markdown)
    png = plot(table, png_path)
    if sup_png is not None:
        sup_png = plot_superb(table, sup_png)
    return {"csv": csv_path, "markdown": md_path, "plot": png, "runs": len(results), "problems": problems,
            "pending": pending,
            "table": table, "superb": sup, "superb_csv": sup_csv, "superb_plot": sup_png}


def main(outputs: str | Path = "outputs") -> None:
    """`qspeech report --outputs <folder>`: make the report, print it and the files written; unreadable
    result files are warnings."""
    out = make_report(outputs)
    for problem in out["problems"]:
        print(f"qspeech: warning: {problem}", file=sys.stderr)
    print(Path(out["markdown"]).read_text())
    written = [out["csv"], out["markdown"], out["plot"], out["superb_csv"], out["superb_plot"]]
    states = [state for _, state, _ in out["pending"]]
    more = "".join(f", {states.count(k)} {k}" for k in ("running", "stopped") if k in states)
    print(f"{out['runs']} runs{more} -> {', '.join(str(p) for p in written if p)}")
