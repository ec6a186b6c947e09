"""The whole upstream in int8 with onnxruntime: static QDQ quantization (calibrated activation scales) of
every convolution, linear and attention matmul of the fp32 ONNX graph, so that onnxruntime fuses them into
int8 kernels (QLinearConv, QGemm, QLinearMatMul / MatMulInteger) and no fp32 island is left but norms,
softmax, GELU and the additions. The quantized model's own weights go in as int8 codes: b-bit codes (b <= 8,
w = q * s per channel or per tensor) are int8 values, so 4/2/1-bit weights run through the same int8
arithmetic exactly, and only the activations (and the weights the model left in full precision) are
rounded by this path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from qspeech.bench.int8 import int8_weight
from qspeech.bench.nbits import weight_index, weight_key
from qspeech.bench.onnxrt import export_onnx
from qspeech.quant import clone_model, quantized_modules, quantized_weight_parts, remove_quantization_

QDQ_OPS = ("Conv", "Gemm", "MatMul")


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a list of input arrays."""

    def __init__(self, batches: list[np.ndarray]):
        self._it = iter([{"wavs": b} for b in batches])

    def get_next(self):
        return next(self._it, None)


def _codes_and_scales(mod: nn.Module) -> tuple[np.ndarray, np.ndarray, str]:
    """(int8 codes shaped like the torch weight, per-output-channel fp32 scales, description)."""
    q, how = int8_weight(quantized_weight_parts(mod), mod.weight.detach().reshape(mod.weight.shape[0], -1))
    codes = q.int_repr().reshape(mod.weight.shape).numpy()
    if q.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scales = q.q_per_channel_scales().float().numpy()
    else:
        scales = np.full(mod.weight.shape[0], q.q_scale(), dtype=np.float32)
    return codes, scales.astype(np.float32), how


def _set(inits: dict, name: str, value: np.ndarray) -> None:
    from onnx import numpy_helper  # heavy (onnx: 1.5 s to import): loaded when a graph is built

    inits[name].CopyFrom(numpy_helper.from_array(value, name))


def _rescale_bias(inits: dict, dq, ratio: np.ndarray) -> None:
    """The int32 bias of a fused int8 Gemm/Conv is read at scale x_scale * w_scale (the quantizer wrote it
    so); when the weight scales change by `ratio`, its scale and integers must follow."""
    from onnx import numpy_helper  # heavy (onnx: 1.5 s to import): loaded when a graph is built

    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
        return
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    old = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    new = old * ratio
    _set(inits, dq.input[1], new.astype(np.float32))
    _set(inits, dq.input[0], np.round(q * old / new).astype(np.int32))


def _own_weights(model, fp_graph, quantized) -> tuple[int, set]:
    """Put each quantized module's own int8 codes and scales into the QDQ model in place of the ones
    onnxruntime's quantizer computed from its fake-quantized fp32 weights (which `fp_graph` holds, matched
    by content). Returns (replaced, grids)."""
    from onnx import helper, numpy_helper  # heavy (onnx: 1.5 s to import): loaded when a graph is built

    qmods = {n: m for n, m in quantized_modules(quantized).items() if isinstance(m, (nn.Linear, nn.Conv1d))}
    transposed, as_is = weight_index({n: m.weight for n, m in qmods.items()})
    by_key = {**{k: (n, False) for k, n in as_is.items()}, **{k: (n, True) for k, n in transposed.items()}}
    names = {}
    for init in fp_graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim >= 2:
            hit = by_key.get(weight_key(arr))
            if hit is not None:
                names[init.name] = hit
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    replaced, grids = 0, set()
    for node in list(model.graph.node):
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith("_quantized"):
            continue
        hit = names.get(node.input[0][: -len("_quantized")])
        if hit is None or node.input[0] not in inits or len(node.input) < 2 or node.input[1] not in inits:
            continue
        name, transposed = hit
        axis = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("axis", 1)
        if axis != (1 if transposed else 0):
            continue  # a layout this rewrite does not know: keep the quantizer's own int8 grid
        codes, scales, how = _codes_and_scales(qmods[name])
        old_scales = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        _set(inits, node.input[0], np.ascontiguousarray(codes.T if transposed else codes))
        _set(inits, node.input[1], scales)
        if len(node.input) > 2 and node.input[2] in inits:
            _set(inits, node.input[2], np.zeros(len(scales), np.int8))
        for op in consumers.get(node.output[0], []):
            if op.op_type in ("Gemm", "Conv") and len(op.input) > 2:
                _rescale_bias(inits, producer.get(op.input[2]), scales.astype(np.float64) / old_scales)
        replaced += 1
        grids.add(how)
    return replaced, grids


def qdq_onnx(fp_onnx: Path, out_path, calibration: list[np.ndarray], quantized=None,
             workdir=None) -> tuple[Path, str, int]:
    """An fp32 ONNX graph statically quantized to int8 (QDQ, per-channel symmetric int8 weights, uint8
    activations with scales calibrated on `calibration`, minmax). With `quantized` (the fake-quantized
    upstream whose weights `fp_onnx` holds: see fake_quant_onnx), its quantized modules keep their own
    codes. Returns (path, weights description, modules with own codes)."""
    import onnx  # heavy (onnx: 1.5 s to import): loaded when a graph is built
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path = Path(out_path)
    pre = Path(workdir or out_path.parent) / (out_path.stem + "_pre.onnx")
    # shape inference and MatMul+Add -> Gemm fusion first, as onnxruntime's quantization tool recommends
    try:
        quant_pre_process(str(fp_onnx), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_path), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QDQ_OPS),
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        grids = {"per-channel symmetric int8 minmax of the fp32 weights (onnxruntime's quantizer)"}
        replaced = 0
        if quantized is not None:
            model = onnx.load(str(out_path))
            replaced, own = _own_weights(model, onnx.load(str(pre)).graph, quantized)
            onnx.save(model, str(out_path))
            grids = own | {f"the other {'weights' if replaced else 'modules'}: onnxruntime's per-channel int8 "
                           f"minmax"}
    finally:
        pre.unlink(missing_ok=True)
    return out_path, "; ".join(sorted(grids)), replaced


def fake_quant_onnx(quantized, wavs: torch.Tensor, path) -> Path:
    """The fake-quantized upstream as an fp32 ONNX graph whose weights are the quantized ones (baked into
    plain parameters of a copy), so that calibration sees the activations of the quantized model."""
    with torch.inference_mode(False):
        baked = remove_quantization_(clone_model(quantized), keep="quantized").requires_grad_(False)
    return export_onnx(baked, wavs, path)
