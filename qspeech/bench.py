"""Measured speed of an upstream's forward pass with real low-bit kernels (the paper only estimates it).

    from qspeech.bench import bench_upstream
    out = bench_upstream(upstream, bits=(8, 4, 2, 1), seconds=10, threads=2, repeats=5)
    out["variants"]["int8_w8a8"]["measured_speedup"]   # {'vs_torch_fp32': ..., 'vs_ort_fp32': ...}

Variants (each: median forward latency over `repeats` runs after `warmup` runs, the runs of all variants
interleaved round by round so that load changes on a shared machine hit them alike; threads pinned with
torch.set_num_threads and onnxruntime's intra_op_num_threads, both recorded):

  torch_fp32            the upstream as built (baseline 1)
  ort_fp32              the same model exported to ONNX (TorchScript exporter; one output per hidden state)
                        and run by onnxruntime (baseline 2: a faster fp32 runtime, so gains are not
                        credited to low bits that come from the runtime)
  torch_bf16            torch.autocast(cpu, bfloat16)
  int8_w8a8             8 bits: the quantized linears as torch.ao dynamic int8 Linear (fbgemm, W8A8 with
                        per-batch dynamic activation scales). Weights: the model's own integer codes and
                        scales when its grid is uniform symmetric per channel / per tensor (rtn, lsq, bit),
                        else torch's per-channel minmax grid of the fake-quantized weights (said in 'weights').
                        The attention projections are routed through their modules (qspeech.quant.api.
                        force_projection_calls) because fairseq's attention otherwise reads q_proj.weight.
  int8_w8a8+cnn_int8    as int8_w8a8, and the CNN front end's convolutions (all but the first, 1-channel one)
                        run as unfold + the same int8 kernel (per-channel minmax weights: the fake-quant
                        model keeps the CNN in full precision, so this adds error)
  nbits_<b>bit          4 / 2 bits (and 3 bits as 4-bit codes, 1 bit as 2-bit codes {1, 3} = -s/+s with the
                        kernel's zero point 2): the ONNX model with every quantized linear's MatMul replaced by
                        onnxruntime's MatMulNBits (block 128, accuracy_level 4 = int8 activations), packed from
                        the model's own codes: a per-channel scale is repeated over the row's blocks, so the
                        kernel's weights equal the fake-quant weights exactly. k-means codebooks have no such
                        kernel; those fall back to symmetric RTN on blocks of 128 of the fake-quant weights.

Each variant's `max_abs_err` is the largest |difference| of the last hidden state against its reference
(`ref`): torch_fp32 for the fp32/bf16 variants, the fake-quantized model at the same bits (after
round_to_storage_, i.e. the model the runner evaluates) for the low-bit ones. `measured_speedup` is the
latency of torch_fp32 (resp. ort_fp32) divided by the variant's. CUDA variants (cuda_fp32, cuda_bf16) are
added when a GPU is present. Speed is noisy on a shared machine: compare ratios from one call only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
SAMPLE_RATE = 16_000
NBITS_BLOCK = 128
NBITS_ACCURACY_LEVEL = 4
DEFAULT_BITS = (8, 4, 2, 1)
RESULT_KEYS = ("device", "cpu", "threads", "seconds", "batch", "repeats", "warmup", "torch", "onnxruntime",
               "quant", "bits", "variants", "measured_speedup", "notes", "onnx")
VARIANT_KEYS = ("ms", "ms_min", "times_ms", "bits", "kernel", "weights", "ref", "max_abs_err", "measured_speedup",
                "measured_speedup_min", "note")


# ----------------------------------------------------------------------------------- helpers


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time(fn, repeats: int, warmup: int, sync=None) -> list[float]:
    for _ in range(max(0, warmup)):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(max(0, repeats)):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def _last(out) -> torch.Tensor:
    return out.hidden_states[-1].detach().float().cpu()


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


class HiddenStates(nn.Module):
    """Upstream -> tuple of hidden states, for ONNX export (one graph output per hidden state). Runs the
    s3prl model without a padding mask (the benchmark's batch has no padding; s3prl's masked index_put does
    not export): the same computation as Upstream.forward with all-valid lengths."""

    def __init__(self, upstream):
        super().__init__()
        self.upstream = upstream

    def forward(self, wavs):
        import torch.nn.functional as F

        from qspeech.upstream.builders import hidden_states_with_hooks

        up = self.upstream
        if up.spec.arch == "distiller":
            return tuple(up(wavs).hidden_states)
        if up.normalize:
            wavs = F.layer_norm(wavs, wavs.shape[-1:])
        if hasattr(up.model, "feature_grad_mult"):
            up.model.feature_grad_mult = 0.0
        states = hidden_states_with_hooks(up.model, lambda: up.model.extract_features(wavs, None, mask=False))
        frames = min(s.shape[1] for s in states)
        return tuple(s[:, :frames] for s in states)


# ----------------------------------------------------------------------------------- int8 (torch)


def int8_weight(parts: dict | None, weight: torch.Tensor) -> tuple[torch.Tensor, str]:
    """A torch per-channel/per-tensor qint8 weight: the model's own codes when its grid allows (uniform
    symmetric per channel or per tensor, 1-bit +-s included), else per-channel minmax of `weight`."""
    if parts is not None and parts["granularity"] in ("channel", "tensor") and parts["format"] in ("symmetric",
                                                                                                   "binary"):
        codes = parts["codes"].to(torch.int64)
        if parts["format"] == "binary":
            codes = 2 * codes - 1
        codes = codes.reshape(codes.shape[0], -1).to(torch.int8)
        scale = parts["scale"].reshape(-1).double()
        if parts["granularity"] == "tensor":
            return torch._make_per_tensor_quantized_tensor(codes, float(scale[0]), 0), "own codes, per tensor"
        zp = torch.zeros(codes.shape[0], dtype=torch.long)
        return torch._make_per_channel_quantized_tensor(codes, scale, zp, 0), "own codes, per channel"
    w = weight.detach().float().reshape(weight.shape[0], -1)
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
    q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    return q, "torch per-channel symmetric minmax of the fake-quant weights (not the model's grid)"


def _dq_linear(weight_q: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DQLinear

    out_f, in_f = weight_q.shape[0], weight_q.shape[1]
    m = DQLinear(in_f, out_f, bias_=bias is not None, dtype=torch.qint8)
    m.set_weight_bias(weight_q, None if bias is None else bias.detach().float())
    return m


class UnfoldInt8Conv1d(nn.Module):
    """Conv1d (no padding, no groups, no dilation) as unfold + a dynamic int8 Linear."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.k, self.s = conv.kernel_size[0], conv.stride[0]
        # what Upstream.conv_layers reads
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        q, self.weights = int8_weight(None, conv.weight.detach().reshape(conv.out_channels, -1))
        self.linear = _dq_linear(q, conv.bias)

    def forward(self, x):  # (B, C, T)
        cols = x.unfold(2, self.k, self.s).permute(0, 2, 1, 3).reshape(x.shape[0], -1, x.shape[1] * self.k)
        return self.linear(cols).transpose(1, 2)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def int8_upstream(upstream_fp, quantized, cnn: bool = False):
    """A copy of the fp upstream whose quantized linears (those of `quantized`, a fake-quantized upstream
    with the same architecture) run torch's dynamic int8 kernel; cnn=True also the CNN convolutions."""
    from qspeech.quant import quantized_modules, quantized_weight_parts
    from qspeech.quant.api import force_projection_calls
    from qspeech.quant.distill import clone_upstream

    up = clone_upstream(upstream_fp)
    up.requires_grad_(False)
    grids = set()
    qmods = quantized_modules(quantized)
    names = [n for n, m in qmods.items() if isinstance(m, nn.Linear)]
    for name in names:
        mod = qmods[name]
        parts = quantized_weight_parts(mod)
        q, how = int8_weight(parts, mod.weight)
        grids.add(how)
        _set_module(up.model, name, _dq_linear(q, mod.bias))
    force_projection_calls(up.model, names)
    if cnn:
        for i, block in enumerate(up.model.feature_extractor.conv_layers):
            conv = block[0]
            if isinstance(conv, nn.Conv1d) and conv.in_channels > 1 and conv.groups == 1 and conv.padding[0] == 0 \
                    and conv.dilation[0] == 1:
                block[0] = UnfoldInt8Conv1d(conv)
                grids.add("CNN: " + block[0].weights)
    return up, "; ".join(sorted(grids))


# ----------------------------------------------------------------------------------- onnxruntime


@contextmanager
def _traceable_s3prl():
    """s3prl's pad_to_multiple calls float.is_integer() on x.size(dim) / multiple, which is a tensor while
    tracing; the export has a fixed input shape, so a python-int version is equivalent."""
    import math

    import torch.nn.functional as F
    from s3prl.upstream.wav2vec2 import wav2vec2_model as w2v

    def pad_to_multiple(x, multiple, dim=-1, value=0):
        if x is None:
            return None, 0
        tsz = int(x.size(dim))
        remainder = math.ceil(tsz / multiple) * multiple - tsz
        if remainder == 0:
            return x, 0
        pad_offset = (0,) * (-1 - dim) * 2
        return F.pad(x, (*pad_offset, 0, remainder), value=value), remainder

    old = w2v.pad_to_multiple
    w2v.pad_to_multiple = pad_to_multiple
    try:
        yield
    finally:
        w2v.pad_to_multiple = old


def export_onnx(upstream, wavs: torch.Tensor, path) -> Path:
    """The upstream (fixed input shape) as ONNX via torch's TorchScript exporter (dynamo=False: the dynamo
    exporter needs onnxscript, which is not installed), outputs h0..hN."""
    import warnings

    path = Path(path)
    wrapper = HiddenStates(upstream).eval()
    n = upstream.num_hidden
    with warnings.catch_warnings(), torch.no_grad(), _traceable_s3prl():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (wavs,), str(path), input_names=["wavs"],
                          output_names=[f"h{i}" for i in range(n)], opset_version=17, do_constant_folding=True,
                          dynamo=False)
    return path


def _ort_session(path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # No busy-waiting between runs: spinning ORT threads would steal the cores from the torch variants
    # timed in between (measured: torch 30x slower beside a spinning session on 2 cores).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _weight_key(w: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(w, dtype=np.float32).tobytes()).hexdigest()


def nbits_blocks(parts: dict | None, weight: torch.Tensor, bits: int, block: int = NBITS_BLOCK):
    """(kernel_bits, unsigned codes (N, K), scales (N, n_blocks) fp32, zero points (N, n_blocks) or None,
    description) for MatMulNBits, from the model's own parts when the grid allows."""
    from qspeech.quant import functional as Fq

    n, k = weight.shape[0], weight[0].numel()
    nb = -(-k // block)
    if parts is not None:
        fmt, gran = parts["format"], parts["granularity"]
        per_block = gran in ("channel", "tensor") or (gran == "group" and parts["group_size"] == block)
        if per_block and fmt in ("symmetric", "binary", "affine"):
            b = int(parts["bits"])
            codes = parts["codes"].reshape(n, k).to(torch.int64)
            if fmt == "binary":  # 1 bit as 2-bit codes {1, 3}, zero point 2: (u - 2) * s = -s / +s
                kb, u = 2, 1 + 2 * codes
            else:
                kb = 4 if b == 3 else b
                u = codes + (2 ** (kb - 1) if fmt == "symmetric" else 0)
            scale = parts["scale"].float()
            scale = scale.reshape(1, 1).expand(n, nb) if gran == "tensor" else (
                scale.reshape(n, 1).expand(n, nb) if gran == "channel" else scale.reshape(n, nb))
            zp = None
            if fmt == "affine":
                z = parts["zero_point"].float()
                z = z.reshape(1, 1).expand(n, nb) if gran == "tensor" else (
                    z.reshape(n, 1).expand(n, nb) if gran == "channel" else z.reshape(n, nb))
                zp = z.round().to(torch.int64)
            return kb, u, scale.contiguous(), zp, f"own codes ({fmt}, {gran}) as {kb}-bit blocks of {block}"
    kb = 4 if bits == 3 else (2 if bits == 1 else bits)
    w = weight.detach().float().reshape(n, k)
    wg = Fq.as_groups(torch.nn.functional.pad(w, (0, nb * block - k)), "group", block)
    s, _ = Fq.rtn_params(wg, kb, symmetric=True)
    u = Fq.rtn_codes(wg, s, None, kb).reshape(n, -1)[:, :k].to(torch.int64) + 2 ** (kb - 1)
    return kb, u, s.float(), None, f"symmetric RTN on blocks of {block} of the fake-quant weights (not the model's grid)"


def nbits_onnx(fp_onnx: Path, out_path, upstream_fp, quantized, bits: int, block: int = NBITS_BLOCK,
               accuracy_level: int = NBITS_ACCURACY_LEVEL) -> tuple[Path, str, int]:
    """Rewrite the fp32 ONNX model: each MatMul whose weight is a quantized linear's (matched by content
    against upstream_fp) becomes MatMulNBits with that module's codes. Returns (path, grids, replaced)."""
    import onnx
    from onnx import helper, numpy_helper

    from qspeech.quant import quantized_modules, quantized_weight_parts
    from qspeech.quant.export import pack_codes

    qmods = {n: m for n, m in quantized_modules(quantized).items() if isinstance(m, nn.Linear)}
    fp_mods = dict(upstream_fp.model.named_modules())
    # MatMul(x, W^T) with W^T folded into an initializer, or Gemm(x, W, bias, transB=1) (2-D inputs)
    by_key = {_weight_key(fp_mods[n].weight.detach().t().numpy()): n for n in qmods}
    by_key_t = {_weight_key(fp_mods[n].weight.detach().numpy()): n for n in qmods}
    model = onnx.load(str(fp_onnx))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes, grids, replaced, drop = [], set(), 0, set()
    for node in g.node:
        name = bias = None
        if node.op_type == "MatMul" and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            name = by_key.get(_weight_key(w)) if w.ndim == 2 else None
        elif node.op_type == "Gemm" and node.input[1] in inits:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transB", 0) == 1 and attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0 \
                    and attrs.get("beta", 1.0) == 1.0:
                w = numpy_helper.to_array(inits[node.input[1]])
                name = by_key_t.get(_weight_key(w)) if w.ndim == 2 else None
                bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if name is not None:
            mod = qmods[name]
            kb, u, scale, zp, how = nbits_blocks(quantized_weight_parts(mod), mod.weight, bits, block)
            grids.add(how)
            n_out, k = u.shape
            nb = scale.shape[1]
            u = torch.nn.functional.pad(u, (0, nb * block - k))
            packed = pack_codes(u, kb).reshape(n_out, nb, block * kb // 8).numpy()
            base = f"nbits_{replaced}"
            g.initializer.extend([numpy_helper.from_array(packed, f"{base}_B"),
                                  numpy_helper.from_array(scale.reshape(-1).numpy().astype(np.float32), f"{base}_s")])
            inputs = [node.input[0], f"{base}_B", f"{base}_s"]
            if zp is not None:
                zrows = [pack_codes(r, kb).numpy() for r in zp]
                g.initializer.append(numpy_helper.from_array(np.concatenate(zrows), f"{base}_z"))
                inputs.append(f"{base}_z")
            outputs = [f"{base}_y"] if bias is not None else list(node.output)
            new_nodes.append(helper.make_node("MatMulNBits", inputs, outputs, name=f"{base}_matmul",
                                              domain="com.microsoft", K=k, N=n_out, bits=kb, block_size=block,
                                              accuracy_level=accuracy_level))
            if bias is not None:
                new_nodes.append(helper.make_node("Add", [outputs[0], bias], list(node.output), name=f"{base}_bias"))
            drop.add(node.input[1])
            replaced += 1
            continue
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    keep = [i for i in g.initializer if i.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(out_path))
    return Path(out_path), "; ".join(sorted(grids)), replaced


# ----------------------------------------------------------------------------------- the benchmark


def _resolve_upstream(upstream_or_cfg):
    from qspeech.upstream import Upstream, build_upstream

    if isinstance(upstream_or_cfg, Upstream):
        return upstream_or_cfg
    cfg = upstream_or_cfg
    model_cfg = cfg.get("model", cfg) if hasattr(cfg, "get") else cfg
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
    precision) in fp32 and with real low-bit kernels for each of `bits` (see the module docstring).

    quant_cfg: how the fake-quant reference (and the codes fed to the kernels) is made; default rtn
    per-channel symmetric on the transformer linears. variants: names to run (default all that apply).
    Returns a dict with RESULT_KEYS; result['variants'][name] has VARIANT_KEYS."""
    from qspeech.quant import QuantConfig, as_quant_config, quantize_
    from qspeech.quant.distill import clone_upstream
    from qspeech.quant.export import round_to_storage_
    from qspeech.train import torch_threads

    upstream = _resolve_upstream(upstream_or_cfg)
    from qspeech.quant import quantized_modules

    if quantized_modules(upstream):
        raise ValueError("bench_upstream takes the full-precision upstream; it quantizes copies itself")
    upstream.eval().requires_grad_(False)
    qcfg = as_quant_config(quant_cfg) if quant_cfg is not None else QuantConfig()
    bits = _as_bits(bits)
    threads = int(threads or torch.get_num_threads())
    wanted = None if variants is None else set(variants)
    g = torch.Generator().manual_seed(seed)
    n = int(round(seconds * SAMPLE_RATE))
    wavs = (torch.randn(batch, n, generator=g) * 0.1).float()
    results: dict[str, dict] = {}
    notes: list[str] = []
    onnx_info = {"exported": False, "error": None}
    tmp = tempfile.TemporaryDirectory(prefix="qspeech-bench-") if workdir is None else nullcontext(workdir)

    def say(msg):
        if progress:
            print(f"[bench] {msg}", flush=True)

    def want(name):
        return wanted is None or name in wanted

    runners: dict[str, tuple] = {}  # name -> (fn, sync): timed after every variant is built

    def record(name, fn, bits_, kernel, weights, ref, err, note=None, sync=None):
        results[name] = {"ms": None, "ms_min": None, "times_ms": [], "bits": bits_, "kernel": kernel,
                         "weights": weights, "ref": ref, "max_abs_err": err, "measured_speedup": {}, "note": note}
        runners[name] = (fn, sync)
        say(f"{name}: ready (max err {err:.3g})")

    def ort_runner(path):
        sess = _ort_session(path, threads)
        feed = {"wavs": wavs.numpy()}
        last = torch.from_numpy(sess.run([sess.get_outputs()[-1].name], feed)[0])
        return (lambda: sess.run(None, feed)), last

    with torch_threads(threads), tmp as wd, torch.inference_mode():
        wd = Path(wd)
        # --- torch fp32 (baseline)
        ref_fp = _last(upstream(wavs))
        record("torch_fp32", lambda: upstream(wavs), 32, "torch fp32", "fp32", "torch_fp32", 0.0)

        # --- onnxruntime fp32 (second baseline)
        fp_onnx = None
        if onnx and (want("ort_fp32") or any(want(f"nbits_{b}bit") for b in bits)):
            try:
                with torch.inference_mode(False), torch.no_grad():
                    fp_onnx = export_onnx(upstream, wavs, wd / "upstream_fp32.onnx")
                onnx_info["exported"] = True
                onnx_info["nodes"] = _op_counts(fp_onnx)
            except Exception as e:  # noqa: BLE001 - report, keep benchmarking torch
                onnx_info["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                notes.append(f"ONNX export failed, no onnxruntime variants: {onnx_info['error']}")
        if fp_onnx is not None and want("ort_fp32"):
            fn, out = ort_runner(fp_onnx)
            record("ort_fp32", fn, 32, "onnxruntime fp32 (CPU EP)", "fp32", "torch_fp32", _err(out, ref_fp))

        # --- torch bf16 autocast
        if want("torch_bf16"):
            def bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return upstream(wavs)
            record("torch_bf16", bf16, 16, "torch.autocast(cpu, bfloat16)", "bf16 casts of fp32", "torch_fp32",
                   _err(_last(bf16()), ref_fp))

        # --- CUDA (when present)
        if torch.cuda.is_available():
            with torch.inference_mode(False):
                dev_up = clone_upstream(upstream).cuda()
            cw = wavs.cuda()

            def cuda_fp32():
                return dev_up(cw)

            def cuda_bf16():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return dev_up(cw)
            record("cuda_fp32", cuda_fp32, 32, f"torch fp32 on {torch.cuda.get_device_name()}", "fp32", "torch_fp32",
                   _err(_last(cuda_fp32()), ref_fp), sync=torch.cuda.synchronize)
            record("cuda_bf16", cuda_bf16, 16, "torch.autocast(cuda, bfloat16)", "bf16", "torch_fp32",
                   _err(_last(cuda_bf16()), ref_fp), sync=torch.cuda.synchronize)

        # --- low bits
        for b in bits:
            if b >= 16:
                notes.append(f"{b} bits: no low-bit kernel to run (see torch_bf16)")
                continue
            say(f"fake-quantizing a copy at {b} bits ({qcfg.method})")
            with torch.inference_mode(False):
                quantized = clone_upstream(upstream)
                quantize_(quantized, qcfg, b)
                round_to_storage_(quantized)
                quantized.requires_grad_(False)
            ref_q = _last(quantized(wavs))
            ref_name = f"fake-quant {qcfg.method} {b}-bit ({qcfg.granularity})"
            if b == 8:
                for name, cnn in (("int8_w8a8", False), ("int8_w8a8+cnn_int8", True)):
                    if not want(name) or (cnn and not cnn_int8):
                        continue
                    with torch.inference_mode(False):
                        up8, grid = int8_upstream(upstream, quantized, cnn=cnn)
                    fn = (lambda m: (lambda: m(wavs)))(up8)
                    record(name, fn, 8, "torch.ao dynamic int8 Linear (fbgemm, W8A8, activations 7-bit reduce_range)"
                           + (" + CNN convs as unfold + int8 Linear" if cnn else ""), grid, ref_name,
                           _err(_last(fn()), ref_q))
            elif fp_onnx is not None and want(f"nbits_{b}bit"):
                path, grid, count = nbits_onnx(fp_onnx, wd / f"upstream_nbits{b}.onnx", upstream, quantized, b)
                fn, out = ort_runner(path)
                kb = 4 if b == 3 else (2 if b == 1 else b)
                note = f"{b}-bit weights run exactly as {kb}-bit codes (no {b}-bit kernel)" if kb != b else None
                record(f"nbits_{b}bit", fn, b,
                       f"onnxruntime MatMulNBits bits={kb} block={NBITS_BLOCK} accuracy_level={NBITS_ACCURACY_LEVEL}"
                       f" ({count} linears; the rest fp32)", grid, ref_name, _err(out, ref_q), note)
            del quantized

        # --- timing: warm-up of each, then `repeats` rounds that run every variant once (interleaved, so
        # load changes on a shared machine hit all variants alike)
        say(f"timing {len(runners)} variants: {warmup} warm-up + {repeats} interleaved rounds")
        for name, (fn, sync) in runners.items():
            _time(fn, 0, warmup, sync)
        for _ in range(max(1, repeats)):
            for name, (fn, sync) in runners.items():
                results[name]["times_ms"].append(round(_time(fn, 1, 0, sync)[0], 2))
        for name, r in results.items():
            r["ms"] = statistics.median(r["times_ms"])
            r["ms_min"] = min(r["times_ms"])
            say(f"{name}: {r['ms']:.1f} ms")
        runners.clear()

    base = results["torch_fp32"]["ms"]
    ort = results.get("ort_fp32", {}).get("ms")
    base_min, ort_min = results["torch_fp32"]["ms_min"], results.get("ort_fp32", {}).get("ms_min")
    speedups = {}
    for name, r in results.items():
        r["measured_speedup"] = {"vs_torch_fp32": round(base / r["ms"], 3),
                                 "vs_ort_fp32": round(ort / r["ms"], 3) if ort else None}
        # the same from the fastest run of each (less sensitive to other jobs on a shared machine)
        r["measured_speedup_min"] = {"vs_torch_fp32": round(base_min / r["ms_min"], 3),
                                     "vs_ort_fp32": round(ort_min / r["ms_min"], 3) if ort_min else None}
        speedups[name] = r["measured_speedup"]
    import onnxruntime

    return {
        "device": "cuda+cpu" if torch.cuda.is_available() else "cpu",
        "cpu": _cpu_name(),
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
        "variants": results,
        "measured_speedup": speedups,
        "notes": notes,
        "onnx": onnx_info,
    }


def _op_counts(path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in m.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:12])


def format_table(result: dict) -> str:
    from tabulate import tabulate

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


# ----------------------------------------------------------------------------------- CLI


def main(cfg, run_dir=None) -> dict:
    """`qspeech bench`: bench the run config's upstream (cfg.model) with cfg.quant at cfg.bench.bits (default:
    cfg.bits, or 8/4/2/1 when cfg.bits is 32); writes run_dir/bench.json and prints the table.
    Keys: bench.seconds, bench.batch, bench.threads, bench.repeats, bench.warmup, bench.bits, bench.variants,
    bench.onnx, bench.cnn_int8."""
    from omegaconf import OmegaConf

    from qspeech.config import output_dir
    from qspeech.results import write_json_atomic
    from qspeech.seeding import seed_everything
    from qspeech.upstream import build_upstream

    run_dir = output_dir(run_dir)
    b = OmegaConf.to_container(cfg.get("bench") or OmegaConf.create({}), resolve=True)
    bits = b.get("bits")
    if bits is None:
        bits = list(DEFAULT_BITS) if int(cfg.bits) >= 32 else [int(cfg.bits)]
    seed_everything(int(cfg.seed))
    upstream = build_upstream(cfg.model)
    out = bench_upstream(upstream, bits=bits, seconds=float(b.get("seconds", 10.0)), batch=int(b.get("batch", 1)),
                         threads=b.get("threads"), repeats=int(b.get("repeats", 5)), warmup=int(b.get("warmup", 1)),
                         quant_cfg=cfg.quant, variants=b.get("variants"), onnx=bool(b.get("onnx", True)),
                         cnn_int8=bool(b.get("cnn_int8", True)), seed=int(cfg.seed), progress=True)
    out["model"] = cfg.model.name  # lets the report put measured speed-ups beside matching runs
    write_json_atomic(run_dir / "bench.json", out)
    print(format_table(out))
    print(f"-> {run_dir / 'bench.json'}")
    return out


__all__ = ["bench_upstream", "export_onnx", "format_table", "int8_upstream", "main", "nbits_blocks", "nbits_onnx",
           "RESULT_KEYS", "VARIANT_KEYS"]
