"""`qspeech bench`: the run config's upstream benchmarked, bench.json written, the table printed."""

from __future__ import annotations

from tabulate import tabulate

from qspeech.atomic import write_json_atomic
from qspeech.bench.variants import DEFAULT_BITS, bench_upstream
from qspeech.config import output_dir
from qspeech.seeding import seed_everything
from qspeech.upstream import build_upstream


def format_table(result: dict) -> str:
    rows = []
    for name, r in result["variants"].items():
        s = r["measured_speedup"]
        m = r.get("measured_speedup_min") or {}
        rows.append((name, f"{r['ms']:.0f}", f"{s['vs_torch_fp32']:.2f}",
                     "" if s["vs_ort_fp32"] is None else f"{s['vs_ort_fp32']:.2f}", f"{r['max_abs_err']:.3g}",
                     f"{r['ms_min']:.0f}", f"{m.get('vs_torch_fp32', float('nan')):.2f}",
                     "" if m.get("vs_ort_fp32") is None else f"{m['vs_ort_fp32']:.2f}"))
    return tabulate(rows, headers=("variant", "ms", "x torch fp32", "x ORT fp32", "max err", "min ms",
                                   "x torch fp32 (min)", "x ORT fp32 (min)"), tablefmt="github")


def _setting(bench, key: str, default):
    """cfg.bench.<key> (a typed config or a DictConfig; absent or null: `default`)."""
    value = getattr(bench, key, None) if bench is not None else None
    return default if value is None else value


def main(cfg, run_dir=None) -> dict:
    """`qspeech bench`: bench the run config's upstream (cfg.model) with cfg.quant at cfg.bench.bits (default:
    cfg.bits, or 8/4/2/1 when cfg.bits is 32); writes run_dir/bench.json and prints the table.
    Keys: bench.seconds, bench.batch, bench.threads, bench.repeats, bench.warmup, bench.bits, bench.variants,
    bench.onnx, bench.cnn_int8."""
    run_dir = output_dir(run_dir)
    b = getattr(cfg, "bench", None)
    bits = _setting(b, "bits", None)
    if bits is None:
        bits = list(DEFAULT_BITS) if int(cfg.bits) >= 32 else [int(cfg.bits)]
    variants = _setting(b, "variants", None)
    seed_everything(int(cfg.seed))
    upstream = build_upstream(cfg.model)
    out = bench_upstream(upstream, bits=bits,
                         seconds=float(_setting(b, "seconds", 10.0)), batch=int(_setting(b, "batch", 1)),
                         threads=_setting(b, "threads", None), repeats=int(_setting(b, "repeats", 5)),
                         warmup=int(_setting(b, "warmup", 1)), quant_cfg=cfg.quant,
                         variants=None if variants is None else list(variants),
                         onnx=bool(_setting(b, "onnx", True)), cnn_int8=bool(_setting(b, "cnn_int8", True)),
                         seed=int(cfg.seed), progress=True)
    out["model"] = cfg.model.name  # lets the report put measured speed-ups beside matching runs
    write_json_atomic(run_dir / "bench.json", out)
    print(format_table(out))
    print(f"-> {run_dir / 'bench.json'}")
    return out
