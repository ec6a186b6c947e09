"""The speed benchmark runs and reports what it documents (no timing asserts: speed is measured by
benchmarks/bench_upstream.py, never asserted in unit tests)."""

import numpy as np
import pytest
import torch

from conftest import random_upstream
from qspeech.bench import RESULT_KEYS, VARIANT_KEYS, bench_upstream, format_table, nbits_blocks
from qspeech.quant import QuantConfig
from qspeech.quant.api import make_weight_quantizer


@pytest.fixture(scope="module")
def result():
    up = random_upstream("tiny_hubert")
    return bench_upstream(up, bits=(8, 2, 1), seconds=0.5, threads=1, repeats=1, warmup=0)


def test_bench_keys(result):
    assert set(RESULT_KEYS) <= set(result)
    names = set(result["variants"])
    assert {"torch_fp32", "ort_fp32", "torch_bf16", "int8_w8a8", "int8_w8a8+cnn_int8", "nbits_2bit",
            "nbits_1bit"} <= names, result["onnx"]
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
    q = make_weight_quantizer(QuantConfig(**{"symmetric": True, **extra}), w, bits)
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
