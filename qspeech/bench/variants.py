"""The benchmark's variants and their driver: bench_upstream builds every variant that applies (each with its
reference output and error), then times them all interleaved (see the package docstring)."""

from __future__ import annotations

import dataclasses
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from qspeech.bench.int8 import int8_upstream
from qspeech.bench.nbits import NBITS_ACCURACY_LEVEL, NBITS_BLOCK, kernel_bits, nbits_onnx
from qspeech.bench.onnxrt import export_onnx, op_counts, ort_runner, profile_shares
from qspeech.bench.qdq import fake_quant_onnx, qdq_onnx
from qspeech.bench.timing import add_speedups, cpu_name, time_interleaved
from qspeech.quant import QuantConfig, as_quant_config, clone_model, quant_config, quantize_, quantized_modules, round_to_storage_
from qspeech.train import torch_threads
from qspeech.upstream import Upstream, build_upstream

SAMPLE_RATE = 16_000
LUT_CONFIG = {"mlas.use_lut_gemm": 1}
DEFAULT_BITS = (8, 4, 2, 1)
# The fake-quant reference and the codes fed to the kernels unless told otherwise: rtn, per channel, symmetric.
DEFAULT_QUANT = quant_config("rtn", symmetric=True)
RESULT_KEYS = ("device", "cpu", "threads", "seconds", "batch", "repeats", "warmup", "torch", "onnxruntime",
               "quant", "bits", "variants", "measured_speedup", "fake_quant_err", "notes", "onnx")
VARIANT_KEYS = ("ms", "ms_min", "times_ms", "bits", "kernel", "weights", "ref", "max_abs_err", "measured_speedup",
                "measured_speedup_min", "note")


def _last(out) -> torch.Tensor:
    return out.hidden_states[-1].detach().float().cpu()


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


class Variants:
    """The variants of one benchmark call: what each runs (timed later, all together) and its result row."""

    def __init__(self, upstream, wavs: torch.Tensor, threads: int, wanted, workdir: Path, progress: bool):
        self.upstream, self.wavs, self.threads, self.wanted = upstream, wavs, threads, wanted
        self.workdir, self.progress = workdir, progress
        self.results: dict[str, dict] = {}
        self.runners: dict[str, tuple] = {}  # name -> (fn, sync)
        self.notes: list[str] = []
        self.onnx_info = {"exported": False, "error": None}
        self.fp_onnx: Path | None = None
        self.ref_fp = _last(upstream(wavs))
        self.fake_quant_err: dict[int, float] = {}

    def say(self, msg: str) -> None:
        if self.progress:
            print(f"[bench] {msg}", flush=True)

    def want(self, name: str) -> bool:
        return self.wanted is None or name in self.wanted

    def record(self, name, fn, bits, kernel, weights, ref, err, note=None, sync=None) -> None:
        self.results[name] = {"ms": None, "ms_min": None, "times_ms": [], "bits": bits, "kernel": kernel,
                              "weights": weights, "ref": ref, "max_abs_err": err, "measured_speedup": {},
                              "note": note}
        self.runners[name] = (fn, sync)
        self.say(f"{name}: ready (max err {err:.3g})")

    # ------------------------------------------------------------------------------- full precision
    def full_precision(self, onnx: bool, bits: list[int]) -> None:
        """torch fp32 (baseline), onnxruntime fp32 (second baseline), torch bf16 autocast, CUDA if present."""
        up, wavs = self.upstream, self.wavs
        self.record("torch_fp32", lambda: up(wavs), 32, "torch fp32", "fp32", "torch_fp32", 0.0)
        if onnx and (self.want("ort_fp32") or any(self.want(f"nbits_{b}bit") or self.want(f"ort_int8_{b}bit")
                                                  for b in bits)):
            self._export_onnx()
        if self.fp_onnx is not None and self.want("ort_fp32"):
            fn, out = ort_runner(self.fp_onnx, wavs, self.threads)
            self.record("ort_fp32", fn, 32, "onnxruntime fp32 (CPU EP)", "fp32", "torch_fp32", _err(out, self.ref_fp))
            self.profile("ort_fp32", self.fp_onnx)
        if self.want("torch_bf16"):
            def bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return up(wavs)
            self.record("torch_bf16", bf16, 16, "torch.autocast(cpu, bfloat16)", "bf16 casts of fp32", "torch_fp32",
                        _err(_last(bf16()), self.ref_fp))
        if torch.cuda.is_available():
            self._cuda()

    def _export_onnx(self) -> None:
        try:
            with torch.inference_mode(False), torch.no_grad():
                self.fp_onnx = export_onnx(self.upstream, self.wavs, self.workdir / "upstream_fp32.onnx")
            self.onnx_info["exported"] = True
            self.onnx_info["nodes"] = op_counts(self.fp_onnx)
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking torch
            self.onnx_info["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            self.notes.append(f"ONNX export failed, no onnxruntime variants: {self.onnx_info['error']}")

    def _cuda(self) -> None:
        with torch.inference_mode(False):
            dev_up = clone_model(self.upstream).cuda()
        cw = self.wavs.cuda()

        def cuda_fp32():
            return dev_up(cw)

        def cuda_bf16():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return dev_up(cw)
        self.record("cuda_fp32", cuda_fp32, 32, f"torch fp32 on {torch.cuda.get_device_name()}", "fp32", "torch_fp32",
                    _err(_last(cuda_fp32()), self.ref_fp), sync=torch.cuda.synchronize)
        self.record("cuda_bf16", cuda_bf16, 16, "torch.autocast(cuda, bfloat16)", "bf16", "torch_fp32",
                    _err(_last(cuda_bf16()), self.ref_fp), sync=torch.cuda.synchronize)

    # ------------------------------------------------------------------------------- low bits
    def low_bits(self, qcfg: QuantConfig, b: int, cnn_int8: bool) -> None:
        """The kernels for b-bit weights, each checked against the fake-quantized model at b bits (rounded to
        its storage, i.e. the model the runner evaluates)."""
        if b >= 16:
            self.notes.append(f"{b} bits: no low-bit kernel to run (see torch_bf16)")
            return
        self.say(f"fake-quantizing a copy at {b} bits ({qcfg.method})")
        with torch.inference_mode(False):
            quantized = clone_model(self.upstream)
            quantize_(quantized, qcfg, b)
            round_to_storage_(quantized)
            quantized.requires_grad_(False)
        ref_q = _last(quantized(self.wavs))
        self.fake_quant_err[b] = _err(ref_q, self.ref_fp)  # what the low-bit kernels' own error is measured against
        ref_name = f"fake-quant {qcfg.method} {b}-bit ({qcfg.granularity})"
        if b <= 8:
            self._int8(quantized, b, ref_q, ref_name, cnn_int8)
        if b < 8 and self.fp_onnx is not None and self.want(f"nbits_{b}bit"):
            self._nbits(quantized, b, ref_q, ref_name)
        if b <= 8 and self.fp_onnx is not None and self.want(f"ort_int8_{b}bit"):
            self._qdq(quantized, b, ref_q, ref_name)

    def _int8(self, quantized, b: int, ref_q, ref_name: str, cnn_int8: bool) -> None:
        # b < 8: the b-bit codes are int8 values, so the same int8 kernel runs them exactly
        names = (("int8_w8a8", False), ("int8_w8a8+cnn_int8", True)) if b == 8 else ((f"int8_w{b}a8", False),)
        for name, cnn in names:
            if not self.want(name) or (cnn and not cnn_int8):
                continue
            with torch.inference_mode(False):
                up8, grid = int8_upstream(self.upstream, quantized, cnn=cnn)
            fn = (lambda m: (lambda: m(self.wavs)))(up8)
            self.record(name, fn, 8, "torch.ao dynamic int8 Linear (fbgemm, W8A8, activations 7-bit reduce_range)"
                        + (" + CNN convs as unfold + int8 Linear" if cnn else ""), grid, ref_name,
                        _err(_last(fn()), ref_q))

    def _nbits(self, quantized, b: int, ref_q, ref_name: str) -> None:
        path, grid, count = nbits_onnx(self.fp_onnx, self.workdir / f"upstream_nbits{b}.onnx", self.upstream,
                                       quantized, b)
        kb = kernel_bits(b)
        note = f"{b}-bit weights run exactly as {kb}-bit codes (no {b}-bit kernel)" if kb != b else None
        kernel = (f"onnxruntime MatMulNBits bits={kb} block={NBITS_BLOCK} accuracy_level={NBITS_ACCURACY_LEVEL}"
                  f" ({count} linears; the rest fp32)")
        fn, out = ort_runner(path, self.wavs, self.threads)
        self.record(f"nbits_{b}bit", fn, b, kernel, grid, ref_name, _err(out, ref_q), note)
        if b == 2:
            self.profile("nbits_2bit", path)
        if kb == 2 and self.want(f"nbits_{b}bit_lut"):
            # onnxruntime's opt-in lookup-table kernel for 2-bit codes (T-MAC; it falls back to the default
            # kernel for shapes it does not take)
            fn, out = ort_runner(path, self.wavs, self.threads, LUT_CONFIG)
            self.record(f"nbits_{b}bit_lut", fn, b, kernel + ", session option mlas.use_lut_gemm=1", grid, ref_name,
                        _err(out, ref_q), note)

    def _qdq(self, quantized, b: int, ref_q, ref_name: str) -> None:
        g = torch.Generator().manual_seed(1)
        calibration = [(torch.randn(self.wavs.shape, generator=g) * 0.1).numpy() for _ in range(2)]
        with torch.inference_mode(False), torch.no_grad():
            fq = fake_quant_onnx(quantized, self.wavs, self.workdir / f"upstream_fq{b}.onnx")
        path, grid, count = qdq_onnx(fq, self.workdir / f"upstream_int8_{b}bit.onnx", calibration, quantized)
        fn, out = ort_runner(path, self.wavs, self.threads)
        self.record(f"ort_int8_{b}bit", fn, b,
                    f"onnxruntime static int8 (QDQ) of the whole graph: convolutions, linears and attention "
                    f"matmuls ({count} modules with their own {b}-bit codes; uint8 activations calibrated on 2 "
                    f"other inputs)", grid, ref_name, _err(out, ref_q))
        if b == 8:
            self.profile("ort_int8_8bit", path)

    def profile(self, name: str, path) -> None:
        """Where the graph's time goes (onnxruntime's profiler): onnx_info['profile'][name]."""
        self.onnx_info.setdefault("profile", {})[name] = profile_shares(path, {"wavs": self.wavs.numpy()},
                                                                         self.threads)

    def time(self, repeats: int, warmup: int) -> None:
        self.say(f"timing {len(self.runners)} variants: {warmup} warm-up + {repeats} interleaved rounds")
        time_interleaved(self.runners, self.results, repeats, warmup)
        for name, r in self.results.items():
            self.say(f"{name}: {r['ms']:.1f} ms")
        self.runners.clear()


def _resolve_upstream(upstream_or_cfg):
    if isinstance(upstream_or_cfg, Upstream):
        return upstream_or_cfg
    cfg = upstream_or_cfg
    model_cfg = cfg.get("model", cfg) if hasattr(cfg, "get") else getattr(cfg, "model", cfg)
    return build_upstream(model_cfg)


def _as_bits(bits) -> list[int]:
    if bits is None:
        return list(DEFAULT_BITS)
    if isinstance(bits, int):
        return [bits]
    return [int(b) for b in bits]


def bench_upstream(upstream_or_cfg, bits=DEFAULT_BITS, seconds: float = 10.0, batch: int = 1,
                   threads: int | None = None, repeats: int = 5, warmup: int = 1, quant_cfg=None,
                   variants=None, onnx: bool = True, cnn_int8: bool = True, workdir=None, seed: int = 0,
                   progress: bool = False) -> dict:
    """Measure the forward latency of an upstream (an Upstream, or a run/model config to build one; full
    precision) in fp32 and with real low-bit kernels for each of `bits` (see the package docstring).

    quant_cfg: how the fake-quant reference (and the codes fed to the kernels) is made; default rtn
    per-channel symmetric on the transformer linears. variants: names to run (default all that apply).
    Returns a dict with RESULT_KEYS; result['variants'][name] has VARIANT_KEYS."""
    upstream = _resolve_upstream(upstream_or_cfg)
    if quantized_modules(upstream):
        raise ValueError("bench_upstream takes the full-precision upstream; it quantizes copies itself")
    upstream.eval().requires_grad_(False)
    qcfg = as_quant_config(quant_cfg) if quant_cfg is not None else DEFAULT_QUANT
    bits = _as_bits(bits)
    threads = int(threads or torch.get_num_threads())
    g = torch.Generator().manual_seed(seed)
    wavs = (torch.randn(batch, int(round(seconds * SAMPLE_RATE)), generator=g) * 0.1).float()
    tmp = tempfile.TemporaryDirectory(prefix="qspeech-bench-") if workdir is None else nullcontext(workdir)
    with torch_threads(threads), tmp as wd, torch.inference_mode():
        v = Variants(upstream, wavs, threads, None if variants is None else set(variants), Path(wd), progress)
        v.full_precision(onnx, bits)
        for b in bits:
            v.low_bits(qcfg, b, cnn_int8)
        v.time(repeats, warmup)
    import onnxruntime  # heavy to import; loaded by the variants above by now (its version is recorded)

    return {
        "device": "cuda+cpu" if torch.cuda.is_available() else "cpu",
        "cpu": cpu_name(),
        "threads": threads,
        "seconds": seconds,
        "batch": batch,
        "repeats": repeats,
        "warmup": warmup,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "model": {"name": upstream.spec.name, "arch": upstream.spec.arch, "source": upstream.spec.source},
        "quant": dataclasses.asdict(qcfg),
        "bits": bits,
        "variants": v.results,
        "measured_speedup": add_speedups(v.results),
        "fake_quant_err": v.fake_quant_err,
        "notes": v.notes,
        "onnx": v.onnx_info,
    }
