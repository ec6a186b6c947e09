"""The README's two demo tables from the result.json files of `qspeech demo [--seeds N]`.

    python benchmarks/demo_tables.py [--outputs outputs] [--plot outputs/pareto.png]

Table 1: every row of the study at seed 0. Table 2: the rows run with several seeds, mean +- sample std.
--plot: test WER (mean over seeds, std as error bars) against storage MB of tiny_hubert's uniform rtn and QAT
rows and the searched (mixed-precision) rows, each family's Pareto front drawn as a line.
Runtime columns: estimated runtime (MACs x weight bits / 32) relative to full-precision tiny_hubert's, and
storage / runtime relative to tiny_distilhubert's, as the paper compares against DistilHuBERT.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from qspeech.results import load_results

PAPER = "| *paper: HuBERT Base, 2 / 1 bit* | | | *12.68 / 15.96* | | *+80 % / +126 %* | | *35.84 / 25.23* | | *0.15 / 0.12* | |"


def row_key(r) -> tuple[str, str, int]:
    """(upstream, quantizer, bits) as the README names them."""
    cfg = r.config
    upstream = "FBANK (no upstream)" if r.model == "fbank" else r.model
    if r.init != "pretrained" and r.model != "fbank":
        upstream += ", random init"
    quant = "-"
    if r.bits < 32:
        quant = {"bit": "bit (QAT)"}.get(r.quant, r.quant)
        if cfg.get("quant", {}).get("overrides"):
            quant += ", searched"
    return upstream, quant, int(r.bits)


def fmt(x, nd=2) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outputs", default="outputs")
    p.add_argument("--plot", default=None, help="write the WER-vs-storage Pareto plot here")
    args = p.parse_args()
    results, problems = load_results(args.outputs)
    by = defaultdict(dict)  # key -> seed -> result
    for r in results:
        if r.ok and r.task == "asr_small":
            by[row_key(r)][int(r.config.get("seed", 0))] = r
    fp = by[("tiny_hubert", "-", 32)][0]
    distil = by.get(("tiny_distilhubert", "-", 32), {}).get(0)
    fp_macs = fp.macs

    def rise(v, ref):
        return f"{100 * (v / ref - 1):+.1f} %"

    def real(r):
        e = r.metrics.eval or {}
        return f"{e['wer']:.1f} / {e['cer']:.1f}" if "wer" in e else ""

    order = sorted(by, key=lambda k: (k[0].startswith("FBANK"), "random" in k[0], "distil" in k[0], -k[2],
                                      "searched" in k[1], not k[1].startswith(("-", "rtn"))))
    print("| upstream | quantized | bits | WER % | CER % | WER rise | real speech WER / CER % | storage MB | packed MB "
          "| est. runtime (vs tiny_hubert) | storage / runtime vs tiny_distilhubert |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in order:
        if 0 not in by[k]:
            continue
        r = by[k][0]
        up = k[0] != "FBANK (no upstream)"
        runtime = r.est_runtime * r.macs / fp_macs if up else None
        vs = (f"{r.storage_mb / distil.storage_mb:.2f} / {r.est_runtime * r.macs / (distil.est_runtime * distil.macs):.2f}"
              if up and distil else "-")
        print(f"| {k[0]} | {k[1]} | {k[2]} | {r.value:.2f} | {r.metrics.cer:.2f} | "
              f"{rise(r.value, fp.value) if k[1] != '-' else ''} | {real(r)} | {fmt(r.storage_mb) if up else '0'} | "
              f"{fmt(r.packed_mb) if up else '-'} | {fmt(runtime, 3) if up else '-'} | {vs} |")
    print(PAPER)
    print()
    if args.plot:
        pareto_plot(by, args.plot)
    seeded = [k for k in order if len(by[k]) > 1]
    if not seeded:
        return
    means = {k: statistics.mean(r.value for r in by[k].values()) for k in seeded}
    ref = means.get(("tiny_hubert", "-", 32))
    print("| tiny_hubert | WER % (seeds) | WER mean +- std | CER mean +- std | real speech WER / CER (mean) | "
          "WER rise (means) |")
    print("|---|---|---|---|---|---|")
    for k in seeded:
        rs = [by[k][s] for s in sorted(by[k])]
        wers, cers = [r.value for r in rs], [r.metrics.cer for r in rs]
        evals = [r.metrics.eval for r in rs if r.metrics.eval]
        real_m = (f"{statistics.mean(e['wer'] for e in evals):.1f} / {statistics.mean(e['cer'] for e in evals):.1f}"
                  if evals else "")
        name = "full precision" if k[1] == "-" else f"{k[1]} {k[2]}-bit"
        print(f"| {name} | {' / '.join(f'{w:.2f}' for w in wers)} | {statistics.mean(wers):.2f} +- "
              f"{statistics.stdev(wers):.2f} | {statistics.mean(cers):.2f} +- {statistics.stdev(cers):.2f} | "
              f"{real_m} | {rise(means[k], ref) if ref and k[1] != '-' else ''} |")
    for p in problems:
        print(f"(problem: {p})")


def front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both storage and WER, by storage."""
    out, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            out.append((x, y))
            best = y
    return out


def pareto_plot(by: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fam = {"uniform rtn": [], "uniform bit (QAT)": [], "searched rtn": [], "searched bit (QAT)": []}
    for (up, quant, bits), seeds in by.items():
        if up != "tiny_hubert":
            continue
        name = ("searched " + quant.replace(", searched", "")) if "searched" in quant else (
            "uniform bit (QAT)" if quant == "bit (QAT)" else "uniform rtn")
        wers = [r.value for r in seeds.values()]
        point = (next(iter(seeds.values())).storage_mb, statistics.mean(wers),
                 statistics.stdev(wers) if len(wers) > 1 else 0.0, bits)
        fam[name].append(point)
        if quant == "-":  # full precision starts both uniform fronts
            fam["uniform bit (QAT)"].append(point)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, pts), style in zip(fam.items(), ("o-", "s-", "D", "*")):
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=style[0], capsize=3,
                    label=name, markersize=9 if style == "*" else 6)
        if "uniform" in name:
            f = front([(p[0], p[1]) for p in pts])
            ax.plot([x for x, _ in f], [y for _, y in f], "-", alpha=0.5, color=ax.lines[-1].get_color())
        for x, y, _, b in pts:
            if "uniform" in name and not (b == 32 and "QAT" in name):  # the shared full-precision point once
                ax.annotate(f"{b}b", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("storage (MB, log scale)")
    ax.set_ylabel("test WER (%)")
    ax.set_title("tiny_hubert on the demo: uniform vs searched bits (mean +- std over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
