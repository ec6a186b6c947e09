"""The speed benchmark runs and reports what it documents (no timing asserts: speed is measured by
benchmarks/bench_upstream.py, never asserted in unit tests)."""

import numpy as np
import pytest
import torch

from conftest import random_upstream
from qspeech.bench import RESULT_KEYS, VARIANT_KEYS, bench_upstream, format_table, nbits_blocks
from qspeech.quant import quant_config
from qspeech.quant.api import make_weight_quantizer


@pytest.fixture(scope="module")
def result():
    up = random_upstream("tiny_hubert")
    return bench_upstream(up, bits=(8, 2, 1), seconds=0.5, threads=1, repeats=1, warmup=0)


def test_bench_keys(result):
    assert set(RESULT_KEYS) <= set(result)
    names = set(result["variants"])
    assert {"torch_fp32", "ort_fp32", "torch_bf16", "int8_w8a8", "int8_w8a8+cnn_int8", "nbits_2bit",
            "nbits_1bit", "nbits_2bit_lut", "int8_w2a8", "int8_w1a8", "ort_int8_8bit", "ort_int8_2bit",
            "ort_int8_1bit"} <= names, \
        result["onnx"]
    for name, v in result["variants"].items():
        assert set(VARIANT_KEYS) <= set(v), name
        assert v["ms"] > 0 and set(v["measured_speedup"]) == {"vs_torch_fp32", "vs_ort_fp32"}
        assert v["max_abs_err"] >= 0 and np.isfinite(v["max_abs_err"])
    assert result["variants"]["torch_fp32"]["measured_speedup"]["vs_torch_fp32"] == 1.0
    assert result["variants"]["ort_fp32"]["measured_speedup"]["vs_ort_fp32"] == 1.0
    assert result["threads"] == 1
    assert "2-bit codes" in result["variants"]["nbits_1bit"]["note"]
    assert result["variants"]["ort_fp32"]["max_abs_err"] < 1e-3  # same model, another runtime
    assert "own codes" in result["variants"]["int8_w8a8"]["weights"]
    assert "torch_fp32" in format_table(result)
    for b in (2, 1):  # low-bit codes in the int8 kernels: the model's own grid
        assert "own codes" in result["variants"][f"int8_w{b}a8"]["weights"]
        assert "own codes" in result["variants"][f"ort_int8_{b}bit"]["weights"]
    shares = result["onnx"]["profile"]
    assert set(shares) == {"ort_fp32", "nbits_2bit", "ort_int8_8bit"}
    for p in shares.values():
        assert p["ms_per_run"] > 0 and abs(sum(p["share"].values()) - 1) < 0.01 and p["share"]["cnn"] > 0


@pytest.mark.parametrize("bits", [8, 2, 1])
def test_whole_graph_int8_runs_the_models_own_codes(tmp_path, bits):
    """qdq_onnx puts a linear's own b-bit codes and scales into the int8 graph (not onnxruntime's regrid of
    the fake-quant weights), rescaling the int32 bias the fused kernel reads at x_scale * w_scale, so the
    output is x @ W_fakequant^T + b up to the rounding of x to uint8."""
    import onnx
    from onnx import numpy_helper

    from qspeech.bench import ort_session
    from qspeech.bench.qdq import qdq_onnx
    from qspeech.quant import clone_model, quantize_, quantized_weight_parts, remove_quantization_
    from qspeech.quant.formats import code_format

    class Proj(torch.nn.Module):  # a module name that quant targets know (kind 'proj')
        def __init__(self):
            super().__init__()
            self.post_extract_proj = torch.nn.Linear(64, 32)

        def forward(self, x):
            return self.post_extract_proj(x)

    g = torch.Generator().manual_seed(bits)
    model = Proj()
    lin = model.post_extract_proj
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=g) * 0.2)
        lin.bias.copy_(torch.randn(32, generator=g))
    quantize_(model, quant_config(symmetric=True, targets=["proj"]), bits)
    baked = remove_quantization_(clone_model(model), keep="quantized")
    x = torch.randn(8, 64, generator=g)
    with torch.no_grad():
        torch.onnx.export(baked, (x,), str(tmp_path / "fp.onnx"), input_names=["wavs"], output_names=["y"],
                          opset_version=17, dynamo=False)
        ref = model(x).numpy()
    path, grid, count = qdq_onnx(tmp_path / "fp.onnx", tmp_path / "q.onnx", [x.numpy()], model)
    assert count == 1 and "own codes" in grid
    parts = quantized_weight_parts(lin)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    int8 = [v for v in inits.values() if v.dtype == np.int8 and v.size == 32 * 64]
    assert len(int8) == 1
    codes = code_format(parts).to_signed(parts["codes"].long()).numpy()  # 1 bit: {0, 1} -> -1 / +1
    assert np.array_equal(int8[0], codes.T) or np.array_equal(int8[0], codes)
    levels = {-1, 1} if bits == 1 else set(range(-(2 ** (bits - 1)), 2 ** (bits - 1)))
    assert set(np.unique(int8[0]).tolist()) <= levels
    y = ort_session(path, 1).run(None, {"wavs": x.numpy()})[0]
    # one uint8 step of x (range / 255) times the largest row sum of |W|, a loose bound the bias bug breaks
    step = float(x.max() - x.min()) / 255
    bound = step * float(lin.weight.detach().abs().sum(1).max())
    assert np.abs(y - ref).max() < bound, (np.abs(y - ref).max(), bound)


@pytest.mark.parametrize("bits,extra", [(4, {}), (2, {}), (3, {}), (1, {}), (2, {"symmetric": False}),
                                        (4, {"granularity": "group", "group_size": 128})])
def test_matmulnbits_packing_is_exact(tmp_path, bits, extra):
    """One MatMulNBits node with fp32 compute (accuracy_level 0) reproduces x @ W_fakequant^T."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qspeech.bench import ort_session
    from qspeech.quant.packing import pack_codes

    n, k = 48, 256
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(bits))
    q = make_weight_quantizer(quant_config(**{"symmetric": True, **extra}), w, bits)
    wq = q(w)
    kb, u, s, zp, how = nbits_blocks(q.parts(w), wq, bits)
    assert "own codes" in how
    nb = s.shape[1]
    inits = [numpy_helper.from_array(pack_codes(u, kb).reshape(n, nb, 128 * kb // 8).numpy(), "B"),
             numpy_helper.from_array(s.reshape(-1).numpy().astype(np.float32), "s")]
    inputs = ["A", "B", "s"]
    if zp is not None:
        inits.append(numpy_helper.from_array(np.concatenate([pack_codes(r, kb).numpy() for r in zp]), "z"))
        inputs.append("z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=kb,
                            block_size=128, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [5, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [5, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(tmp_path / "one.onnx"))
    a = torch.randn(5, k, generator=torch.Generator().manual_seed(0))
    y = ort_session(tmp_path / "one.onnx", 1).run(None, {"A": a.numpy()})[0]
    ref = (a.double() @ wq.double().T).numpy()
    assert np.abs(y - ref).max() < 1e-4 * np.abs(ref).max()
