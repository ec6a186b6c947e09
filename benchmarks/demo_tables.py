"""The README's two demo tables from the result.json files of `qspeech demo [--seeds N]`.

    python benchmarks/demo_tables.py [--outputs outputs]

Table 1: every row of the study at seed 0. Table 2: the rows run with several seeds, mean +- sample std.
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
    args = p.parse_args()
    results, problems = load_results(args.outputs)
    by = defaultdict(dict)  # key -> seed -> result
    for r in results:
        if r.ok and r.task == "asr_small":
            by[row_key(r)][int(r.config.get("seed", 0))] = r
    fp = by[("tiny_hubert", "-", 32)][0]
    distil = by[("tiny_distilhubert", "-", 32)][0]
    fp_macs, d_runtime = fp.macs, distil.est_runtime * distil.macs

    def rise(v, ref):
        return f"{100 * (v / ref - 1):+.1f} %"

    def real(r):
        e = r.metrics.eval or {}
        return f"{e['wer']:.1f} / {e['cer']:.1f}" if "wer" in e else ""

    order = sorted(by, key=lambda k: (k[0].startswith("FBANK"), "random" in k[0], "distil" in k[0], -k[2],
                                      "searched" in k[1], k[1]))
    print("| upstream | quantized | bits | WER % | CER % | WER rise | real speech WER / CER % | storage MB | packed MB "
          "| est. runtime (vs tiny_hubert) | storage / runtime vs tiny_distilhubert |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in order:
        if 0 not in by[k]:
            continue
        r = by[k][0]
        up = k[0] != "FBANK (no upstream)"
        runtime = r.est_runtime * r.macs / fp_macs if up else None
        vs = f"{r.storage_mb / distil.storage_mb:.2f} / {r.est_runtime * r.macs / d_runtime:.2f}" if up else "-"
        print(f"| {k[0]} | {k[1]} | {k[2]} | {r.value:.2f} | {r.metrics.cer:.2f} | "
              f"{rise(r.value, fp.value) if k[1] != '-' else ''} | {real(r)} | {fmt(r.storage_mb)} | "
              f"{fmt(r.packed_mb) if up else '-'} | {fmt(runtime, 3) if up else '-'} | {vs} |")
    print(PAPER)
    print()
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


if __name__ == "__main__":
    main()
