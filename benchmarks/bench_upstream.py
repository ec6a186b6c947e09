"""The README's speed table: the whole HuBERT (Base architecture, random weights) upstream forward on 10 s of
audio, batch 1, 2 threads, with real kernels at each precision.

    python benchmarks/bench_upstream.py                      # ~10 min on a 2-core machine
    python benchmarks/bench_upstream.py --repeats 5 --threads 4 --out outputs/bench

Columns: median ms, speedup vs torch fp32 and vs onnxruntime fp32 (measured in this one process), and the max
abs error of the last hidden state against the variant's reference (torch fp32 for fp32/bf16; the
fake-quantized rtn per-channel model at the same bits, rounded to its fp16 storage, for the low-bit rows).
Writes <out>/bench_upstream.json and <out>/bench_upstream.md. Speed is never asserted by the tests; this
script states whether the issue's targets (8-bit >= 2x, 2-bit >= 1.5x vs torch fp32) were reached and, if
not, what limits them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# issue 16: 8-bit >= 2x and 2-bit >= 2x torch fp32, low-bit error within the fake-quant model's own error
TARGETS = {"int8_w8a8": 2.0, "int8_w8a8+cnn_int8": 2.0, "ort_int8_8bit": 2.0, "nbits_2bit": 2.0,
           "nbits_2bit_lut": 2.0, "int8_w2a8": 2.0, "ort_int8_2bit": 2.0}


def cnn_share(upstream, seconds: float, threads: int, repeats: int) -> dict:
    """fp32 time of the CNN front end alone vs the whole forward (what weight quantization of the linears
    cannot touch)."""
    wavs = torch.randn(1, int(seconds * 16000), generator=torch.Generator().manual_seed(0)) * 0.1
    torch.set_num_threads(threads)
    fe = upstream.model.feature_extractor
    with torch.inference_mode():
        fe(wavs)
        cnn, full = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            fe(wavs)
            cnn.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            upstream(wavs)
            full.append((time.perf_counter() - t) * 1e3)
    c, f = statistics.median(cnn), statistics.median(full)
    return {"cnn_ms": round(c, 1), "forward_ms": round(f, 1), "cnn_share": round(c / f, 3)}


def verdict(result: dict, share: dict) -> list[str]:
    lines = []
    v = result["variants"]
    for name, target in TARGETS.items():
        if name not in v:
            continue
        got = v[name]["measured_speedup"]["vs_torch_fp32"]
        ok = "reached" if got >= target else "NOT reached"
        err, own = v[name]["max_abs_err"], result.get("fake_quant_err", {}).get(v[name]["bits"])
        within = "" if own is None else (f"; max err {err:.3g} vs the fake-quant model's own {own:.3g} (against fp32): "
                                         + ("within" if err <= own else "NOT within"))
        lines.append(f"- {name}: {got:.2f}x vs torch fp32 (target {target}x: {ok}); "
                     f"{v[name]['measured_speedup']['vs_ort_fp32']}x vs ORT fp32{within}")
    if "linear" in result:
        li = result["linear"]
        lines.append(f"- one linear (768x3072, 500 rows): fp32 {li['fp32_ms']:.1f} ms, int8 {li['int8_ms']:.1f} ms "
                     f"= {li['int8_speedup']:.2f}x: the most the 8-bit kernel gives on this CPU.")
    lines.append(f"- CNN front end (fp32, torch): {share['cnn_ms']:.0f} ms of a {share['forward_ms']:.0f} ms forward "
                 f"({100 * share['cnn_share']:.0f} %); weight quantization of the transformer linears cannot make "
                 f"the forward faster than 1/{share['cnn_share']:.2f} = {1 / max(share['cnn_share'], 1e-9):.2f}x "
                 f"unless the CNN gets a faster kernel too.")
    return lines


def cpu_features() -> list[str]:
    """The CPU flags that decide which int8 / bf16 kernels are fast (Linux /proc/cpuinfo)."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return []
    want = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    have = set(flags.split(":", 1)[-1].split())
    return [f for f in want if f in have]


def limits(features: list[str]) -> str:
    vnni = any(f in features for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    bf16 = any(f in features for f in ("avx512_bf16", "amx_bf16"))
    return "\n".join([
        f"What limits the speed on this CPU ({', '.join(features) or 'flags unknown'}):",
        "- int8 GEMMs: " + ("VNNI present, so an int8 GEMM is several times a fp32 one (see 'one linear')."
                            if vnni else "no VNNI (AVX2 only): an int8 GEMM is only ~1.7x a fp32 one."),
        "- Linears alone in int8 (int8_w*a8: torch dynamic W8A8) leave the CNN front end, the attention matmuls",
        "  and torch's per-call quantization overhead in fp32; the whole-graph int8 rows (ort_int8_*: static QDQ)",
        "  run convolutions, linears and attention matmuls in int8 and are the fastest.",
        "- b-bit weights (b < 8) gain nothing over 8-bit in compute: the forward of ~500 frames is compute-bound,",
        "  so their codes run through the same int8 arithmetic (int8_w<b>a8, ort_int8_<b>bit) at the same speed;",
        "  onnxruntime's MatMulNBits kernels (made for LLM decoding, few rows) are slower than its int8 GEMM on",
        "  these ~500-row inputs (compare MatMulNBits with QGemm in the profile); 1 bit has no kernel (2-bit codes).",
        "- bf16: " + ("AVX512-BF16 present: torch's bf16 autocast is faster than fp32."
                      if bf16 else "emulated without AVX512-BF16/AMX, hence several times slower than fp32."),
        "- Static int8 adds the activations' rounding to the weights' (max err against the fake-quant model):",
        "  at 8 bits that is more than the weights' own error, at 2 and 1 bits far less.",
    ])


def one_linear(threads: int, repeats: int = 10) -> dict:
    """fp32 vs dynamic int8 for one 768x3072 linear on 500 rows (the kernel ratio this CPU allows)."""
    from torch.ao.nn.quantized.dynamic import Linear as DQLinear

    torch.set_num_threads(threads)
    x = torch.randn(1, 500, 768)
    lin = torch.nn.Linear(768, 3072)
    q = DQLinear(768, 3072)
    w = lin.weight.detach()
    s = (w.abs().amax(1) / 127).double()
    q.set_weight_bias(torch.quantize_per_channel(w, s, torch.zeros(3072, dtype=torch.long), 0, torch.qint8),
                      lin.bias.detach())

    def med(f):
        f()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            f()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)

    with torch.inference_mode():
        a, b = med(lambda: lin(x)), med(lambda: q(x))
    return {"fp32_ms": round(a, 2), "int8_ms": round(b, 2), "int8_speedup": round(a / b, 2)}


def markdown(result: dict, share: dict, cmd: str) -> str:
    from qspeech.bench import format_table

    head = (f"Measured on {result['cpu']}, {result['threads']} threads, torch {result['torch']}, onnxruntime "
            f"{result['onnxruntime']}; HuBERT Base (random weights), {result['seconds']:g} s of audio, batch "
            f"{result['batch']}, median of {result['repeats']} after {result['warmup']} warm-up.\n"
            f"Command: `{cmd}`\n")
    notes = [f"- {k}: {r['note']}" for k, r in result["variants"].items() if r.get("note")]
    grids = [f"- {k}: weights = {r['weights']}; kernel = {r['kernel']}" for k, r in result["variants"].items()]
    prof = [f"- {k}: {p['ms_per_run']:.0f} ms of node time per run; "
            + ", ".join(f"{part} {100 * x:.0f} %" for part, x in p["share"].items())
            + "; costliest kernels (ms): " + ", ".join(f"{op} {ms:.0f}" for op, ms in p["ops_ms"].items())
            for k, p in result.get("onnx", {}).get("profile", {}).items()]
    if prof:
        prof = ["", "Where the onnxruntime graphs spend their time (onnxruntime's profiler, same input):", *prof]
    return "\n".join([head, format_table(result), "", *verdict(result, share), *notes, *prof, "", "Variants:", *grids,
                      "", limits(result.get("cpu_features", [])), *[f"- note: {n}" for n in result["notes"]], ""])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="hubert", help="conf/model/<name>.yaml (random weights)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--bits", default="8,4,2,1")
    p.add_argument("--variants", default=None, help="comma-separated subset of variant names")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench"))
    args = p.parse_args(argv)

    import dataclasses

    from omegaconf import OmegaConf

    from qspeech.atomic import write_json_atomic
    from qspeech.bench import bench_upstream
    from qspeech.checks import typed
    from qspeech.upstream import build_upstream
    from qspeech.upstream.config import ModelConfig

    cfg = typed(ModelConfig, OmegaConf.load(ROOT / "conf" / "model" / f"{args.model}.yaml"), "model")
    cfg = dataclasses.replace(cfg, init="random")
    torch.manual_seed(0)
    upstream = build_upstream(cfg)
    result = bench_upstream(upstream, bits=[int(b) for b in args.bits.split(",")], seconds=args.seconds, batch=1,
                            threads=args.threads, repeats=args.repeats, warmup=args.warmup,
                            variants=args.variants.split(",") if args.variants else None, progress=True)
    share = cnn_share(upstream, args.seconds, args.threads, args.repeats)
    result["cnn"] = share
    result["linear"] = one_linear(args.threads)
    result["cpu_features"] = cpu_features()
    cmd = "python benchmarks/bench_upstream.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "bench_upstream.json", result)
    md = markdown(result, share, cmd.strip())
    (out / "bench_upstream.md").write_text(md)
    print(md)
    print(f"-> {out / 'bench_upstream.json'}, {out / 'bench_upstream.md'}")
    return result


if __name__ == "__main__":
    main()
