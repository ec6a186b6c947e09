"""4 / 2 bits (and 3 bits as 4-bit codes, 1 bit as 2-bit codes) with onnxruntime's MatMulNBits: the fp32 ONNX
graph with every quantized linear's MatMul replaced by MatMulNBits holding the model's own codes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

import qspeech.quant.functional as Fq
from qspeech.quant import quantized_modules, quantized_weight_parts
from qspeech.quant.formats import code_format
from qspeech.quant.packing import pack_codes

NBITS_BLOCK = 128
NBITS_ACCURACY_LEVEL = 4  # int8 activations


def kernel_bits(bits: int) -> int:
    """The MatMulNBits code width that runs `bits`-bit weights exactly (no 1- or 3-bit kernel)."""
    return {1: 2, 3: 4}.get(int(bits), int(bits))


def _per_block(t: torch.Tensor, gran: str, n: int, nb: int) -> torch.Tensor:
    """(R, G) scales or zero points -> (n, nb): one per block of the row, repeated from tensor/channel ones."""
    if gran == "tensor":
        return t.reshape(1, 1).expand(n, nb)
    return t.reshape(n, 1).expand(n, nb) if gran == "channel" else t.reshape(n, nb)


def _own_blocks(parts: dict, n: int, k: int, nb: int, block: int):
    """nbits_blocks from the model's own codes: w = q*s grids use the kernel's default zero point
    2^(kb-1), affine grids their own zero points."""
    fmt, gran = code_format(parts), parts["granularity"]
    kb = kernel_bits(parts["bits"])
    codes = parts["codes"].reshape(n, k).to(torch.int64)
    u = fmt.to_signed(codes) + 2 ** (kb - 1) if fmt.to_signed is not None else codes
    scale = _per_block(parts["scale"].float(), gran, n, nb)
    zp = None
    if "zero_point" in fmt.params:
        zp = _per_block(parts["zero_point"].float(), gran, n, nb).round().to(torch.int64)
    return kb, u, scale.contiguous(), zp, f"own codes ({fmt.name}, {gran}) as {kb}-bit blocks of {block}"


def nbits_blocks(parts: dict | None, weight: torch.Tensor, bits: int, block: int = NBITS_BLOCK):
    """(kernel_bits, unsigned codes (N, K), scales (N, n_blocks) fp32, zero points (N, n_blocks) or None,
    description) for MatMulNBits, from the model's own parts when the grid allows (a uniform grid with one
    scale per tensor, channel or block of `block`); else symmetric RTN on blocks of the weights."""
    n, k = weight.shape[0], weight[0].numel()
    nb = -(-k // block)
    if parts is not None:
        gran = parts["granularity"]
        per_block = gran in ("channel", "tensor") or (gran == "group" and parts["group_size"] == block)
        if per_block and code_format(parts).uniform:
            return _own_blocks(parts, n, k, nb, block)
    kb = kernel_bits(bits)
    w = weight.detach().float().reshape(n, k)
    wg = Fq.as_groups(torch.nn.functional.pad(w, (0, nb * block - k)), "group", block)
    s, _ = Fq.rtn_params(wg, kb, symmetric=True)
    u = Fq.rtn_codes(wg, s, None, kb).reshape(n, -1)[:, :k].to(torch.int64) + 2 ** (kb - 1)
    grid = f"symmetric RTN on blocks of {block} of the fake-quant weights (not the model's grid)"
    return kb, u, s.float(), None, grid


def weight_key(w: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(w, dtype=np.float32).tobytes()).hexdigest()


def weight_index(weights: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(content key of W^T -> name, content key of W -> name): how to find a module's weight among an ONNX
    graph's initializers, which hold a linear's weight transposed (MatMul) or as it is (Gemm transB=1, Conv)."""
    transposed = {weight_key(w.detach().t().numpy()): n for n, w in weights.items() if w.ndim == 2}
    as_is = {weight_key(w.detach().numpy()): n for n, w in weights.items()}
    return transposed, as_is


def _match(node, inits: dict, by_key: dict, by_key_t: dict):
    """(quantized linear's name, bias input) when `node` multiplies by one of their weights, else (None, None):
    MatMul(x, W^T) with W^T folded into an initializer, or Gemm(x, W, bias, transB=1) (2-D inputs)."""
    from onnx import helper, numpy_helper  # heavy (onnx: 1.5 s to import): loaded when a graph is built

    if node.op_type == "MatMul" and node.input[1] in inits:
        w = numpy_helper.to_array(inits[node.input[1]])
        return (by_key.get(weight_key(w)) if w.ndim == 2 else None), None
    if node.op_type == "Gemm" and node.input[1] in inits:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transB", 0) == 1 and attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0 \
                and attrs.get("beta", 1.0) == 1.0:
            w = numpy_helper.to_array(inits[node.input[1]])
            name = by_key_t.get(weight_key(w)) if w.ndim == 2 else None
            return name, (node.input[2] if len(node.input) > 2 and node.input[2] else None)
    return None, None


def _nbits_nodes(node, bias, mod: nn.Module, bits: int, block: int, accuracy_level: int, base: str):
    """(new nodes, new initializers, grid description) computing `node`'s output with MatMulNBits."""
    from onnx import helper, numpy_helper  # heavy (onnx: 1.5 s to import): loaded when a graph is built

    kb, u, scale, zp, how = nbits_blocks(quantized_weight_parts(mod), mod.weight, bits, block)
    n_out, k = u.shape
    nb = scale.shape[1]
    u = torch.nn.functional.pad(u, (0, nb * block - k))
    packed = pack_codes(u, kb).reshape(n_out, nb, block * kb // 8).numpy()
    inits = [numpy_helper.from_array(packed, f"{base}_B"),
             numpy_helper.from_array(scale.reshape(-1).numpy().astype(np.float32), f"{base}_s")]
    inputs = [node.input[0], f"{base}_B", f"{base}_s"]
    if zp is not None:
        zrows = [pack_codes(r, kb).numpy() for r in zp]
        inits.append(numpy_helper.from_array(np.concatenate(zrows), f"{base}_z"))
        inputs.append(f"{base}_z")
    outputs = [f"{base}_y"] if bias is not None else list(node.output)
    name = node.name or base  # the original node's name: the profiler's parts (qdq.profile_shares) read it
    nodes = [helper.make_node("MatMulNBits", inputs, outputs, name=f"{name}/MatMulNBits", domain="com.microsoft",
                              K=k, N=n_out, bits=kb, block_size=block, accuracy_level=accuracy_level)]
    if bias is not None:
        nodes.append(helper.make_node("Add", [outputs[0], bias], list(node.output), name=f"{name}/bias"))
    return nodes, inits, how


def nbits_onnx(fp_onnx: Path, out_path, upstream_fp, quantized, bits: int, block: int = NBITS_BLOCK,
               accuracy_level: int = NBITS_ACCURACY_LEVEL) -> tuple[Path, str, int]:
    """Rewrite the fp32 ONNX model: each MatMul whose weight is a quantized linear's (matched by content
    against upstream_fp) becomes MatMulNBits with that module's codes. Returns (path, grids, replaced)."""
    import onnx  # heavy (onnx: 1.5 s to import): loaded when a graph is built
    from onnx import helper

    qmods = {n: m for n, m in quantized_modules(quantized).items() if isinstance(m, nn.Linear)}
    fp_mods = dict(upstream_fp.model.named_modules())
    by_key, by_key_t = weight_index({n: fp_mods[n].weight for n in qmods})
    model = onnx.load(str(fp_onnx))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes, grids, replaced, drop = [], set(), 0, set()
    for node in g.node:
        name, bias = _match(node, inits, by_key, by_key_t)
        if name is None:
            new_nodes.append(node)
            continue
        nodes, new_inits, how = _nbits_nodes(node, bias, qmods[name], bits, block, accuracy_level,
                                             f"nbits_{replaced}")
        g.initializer.extend(new_inits)
        new_nodes.extend(nodes)
        grids.add(how)
        drop.add(node.input[1])
        replaced += 1
    del g.node[:]
    g.node.extend(new_nodes)
    keep = [i for i in g.initializer if i.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(out_path))
    return Path(out_path), "; ".join(sorted(grids)), replaced
