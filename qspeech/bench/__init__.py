"""Measured speed of an upstream's forward pass with real low-bit kernels (the paper only estimates it).

    from qspeech.bench import bench_upstream
    out = bench_upstream(upstream, bits=(8, 4, 2, 1), seconds=10, threads=2, repeats=5)
    out["variants"]["int8_w8a8"]["measured_speedup"]   # {'vs_torch_fp32': ..., 'vs_ort_fp32': ...}

One job per module: timing (interleaved runs, speed-ups), onnxrt (ONNX export, onnxruntime sessions and their
profile by part of the model), int8 (torch's dynamic int8 kernel), nbits (MatMulNBits graphs from the model's
codes), qdq (the whole graph in static int8 with the model's own codes), variants (the variant table and
bench_upstream), command (`qspeech bench` and its table).

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
  int8_w<b>a8           4 / 2 / 1 bits through the same int8 kernel: b-bit codes are int8 values (1 bit: -1 / +1),
                        so the arithmetic is int8 and the weights are exactly the model's
  int8_w8a8+cnn_int8    as int8_w8a8, and the CNN front end's convolutions (all but the first, 1-channel one)
                        run as unfold + the same int8 kernel (per-channel minmax weights: the fake-quant
                        model keeps the CNN in full precision, so this adds error)
  nbits_<b>bit          4 / 2 bits (and 3 bits as 4-bit codes, 1 bit as 2-bit codes {1, 3} = -s/+s with the
                        kernel's zero point 2): the ONNX model with every quantized linear's MatMul replaced by
                        onnxruntime's MatMulNBits (block 128, accuracy_level 4 = int8 activations), packed from
                        the model's own codes: a per-channel scale is repeated over the row's blocks, so the
                        kernel's weights equal the fake-quant weights exactly. k-means codebooks have no such
                        kernel; those fall back to symmetric RTN on blocks of 128 of the fake-quant weights.
  nbits_<b>bit_lut      2-bit codes (b = 2, 1) with onnxruntime's opt-in lookup-table kernel (session option
                        mlas.use_lut_gemm=1; shapes it does not take fall back to the default kernel)
  ort_int8_<b>bit       8 / 4 / 2 / 1 bits, the whole graph in int8: the fake-quantized model exported to ONNX,
                        statically quantized by onnxruntime (QDQ: convolutions, linears and attention matmuls,
                        uint8 activations calibrated on two other inputs), then the quantized modules' own codes
                        and scales written over onnxruntime's regrid (their int32 biases rescaled to match)

Each variant's `max_abs_err` is the largest |difference| of the last hidden state against its reference
(`ref`): torch_fp32 for the fp32/bf16 variants, the fake-quantized model at the same bits (after
round_to_storage_, i.e. the model the runner evaluates) for the low-bit ones. `measured_speedup` is the
latency of torch_fp32 (resp. ort_fp32) divided by the variant's; `fake_quant_err[b]` is the fake-quantized
model's own error against torch_fp32, which a b-bit kernel's error should stay within. onnx['profile']
says where ort_fp32, nbits_2bit and ort_int8_8bit spend their time (part of the model, costliest kernels).
CUDA variants (cuda_fp32, cuda_bf16) are added when a GPU is present. Speed is noisy on a shared machine:
compare ratios from one call only.
"""

from qspeech.bench.command import format_table, main
from qspeech.bench.int8 import int8_upstream, int8_weight
from qspeech.bench.nbits import nbits_blocks, nbits_onnx
from qspeech.bench.onnxrt import export_onnx, ort_session
from qspeech.bench.variants import DEFAULT_BITS, RESULT_KEYS, VARIANT_KEYS, bench_upstream

__all__ = ["DEFAULT_BITS", "RESULT_KEYS", "VARIANT_KEYS", "bench_upstream", "export_onnx", "format_table",
           "int8_upstream", "int8_weight", "main", "nbits_blocks", "nbits_onnx", "ort_session"]
