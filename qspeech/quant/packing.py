"""Bit packing of integer codes, and rounding a quantized model to what its packed file stores.

Code packing (`pack_codes`): codes are first made unsigned (formats.CodeFormat.code_offset: symmetric codes
get +2^(b-1), so q in [-(2^(b-1)-1), 2^(b-1)-1] or LSQ's [-2^(b-1), 2^(b-1)-1] lands in [0, 2^b-1];
'binary' codes are 0/1 for -s/+s; 'affine' and 'codebook' codes already are), flattened row-major in the
weight's own shape, and written as one little-endian bit stream: code i occupies stream bits [i*b, (i+1)*b),
least significant bit first, and stream bit k is bit (k mod 8) of byte k // 8 (so at 2 bits, byte 0 = c0 |
c1<<2 | c2<<4 | c3<<6). Any b from 1 to 8 packs densely this way (3 bits: 8 codes in 3 bytes) and 16 bits is
the codes' little-endian uint16 bytes. The last byte is zero-padded.

Exactness. The evaluated fake-quant model is fp32; the packed file (qspeech.export) stores fp16 (the paper's
storage convention: everything but the codes at 16 bits), so the two are identical only if the evaluated
model's values were already fp16-representable. `round_to_storage_(model)` does that in place *before
evaluation* (the runner calls it right after quantization): every tensor that the file stores as fp16 (the
non-quantized parameters and buffers, the scales / zero points / codebooks / LSQ steps, the activation
quantizers' alpha and beta) is rounded to its nearest fp16 value; the latent full-precision weights of the
quantized modules are left alone (only their codes are stored, and those are recomputed from the rounded
scales). A quantizer whose parameters are not stored values (BiT's 1 bit recomputes mean|W| in every
forward) is replaced by its method's storage form (QuantMethod.storage_form), with the same codes.
"""

from __future__ import annotations

import numpy as np
import torch

from qspeech.quant.api import inner_model, quantized_modules, weight_quantizer
from qspeech.quant.formats import code_format
from qspeech.quant.registry import get_method
from qspeech.quant.targets import PRETRAINING_HEADS

FP16_MIN_POS = 2.0**-24  # smallest positive fp16 (subnormal)
FP16_MAX = 65504.0

# ----------------------------------------------------------------------------------- bit packing


def packed_nbytes(n: int, bits: int) -> int:
    return (int(n) * int(bits) + 7) // 8


def pack_codes(codes, bits: int) -> torch.Tensor:
    """Unsigned integer codes in [0, 2^bits-1] (any shape, flattened row-major) -> uint8 bit stream
    (LSB first, see the module docstring). bits: 1..8 or 16."""
    bits = int(bits)
    c = torch.as_tensor(codes).reshape(-1).to(torch.int64).numpy()
    n = c.size
    if c.size and (c.min() < 0 or c.max() >= 2**bits):
        raise ValueError(f"codes outside [0, {2**bits - 1}] for {bits} bits")
    if bits == 16:
        return torch.from_numpy(c.astype("<u2").view(np.uint8).copy())
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes (1..8 or 16)")
    if bits == 8:
        return torch.from_numpy(c.astype(np.uint8))
    if 8 % bits == 0:  # 1, 2, 4: whole codes per byte
        per = 8 // bits
        pad = (-n) % per
        g = np.concatenate([c, np.zeros(pad, np.int64)]).reshape(-1, per).astype(np.uint8)
        out = np.zeros(g.shape[0], np.uint8)
        for j in range(per):
            out |= g[:, j] << np.uint8(j * bits)
        return torch.from_numpy(out)
    # 3, 5, 6, 7: 8 codes -> `bits` bytes through a 64-bit word
    pad = (-n) % 8
    g = np.concatenate([c, np.zeros(pad, np.int64)]).reshape(-1, 8).astype(np.uint64)
    word = np.zeros(g.shape[0], np.uint64)
    for j in range(8):
        word |= g[:, j] << np.uint64(j * bits)
    out = np.stack([(word >> np.uint64(8 * k)) & np.uint64(0xFF) for k in range(bits)], 1).astype(np.uint8)
    return torch.from_numpy(out.reshape(-1)[: packed_nbytes(n, bits)].copy())


def unpack_codes(packed, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes: the first n codes (int64, 1-D)."""
    bits, n = int(bits), int(n)
    b = torch.as_tensor(packed).reshape(-1).numpy().astype(np.uint8)
    if bits == 16:
        return torch.from_numpy(b[: 2 * n].view("<u2").astype(np.int64))
    if bits == 8:
        return torch.from_numpy(b[:n].astype(np.int64))
    if 8 % bits == 0:
        per = 8 // bits
        mask = np.uint8(2**bits - 1)
        g = np.stack([(b >> np.uint8(j * bits)) & mask for j in range(per)], 1)
        return torch.from_numpy(g.reshape(-1)[:n].astype(np.int64))
    nb = packed_nbytes(-(-n // 8) * 8, bits)
    b = np.concatenate([b, np.zeros(nb - b.size, np.uint8)]).reshape(-1, bits).astype(np.uint64)
    word = np.zeros(b.shape[0], np.uint64)
    for k in range(bits):
        word |= b[:, k] << np.uint64(8 * k)
    mask = np.uint64(2**bits - 1)
    g = np.stack([(word >> np.uint64(j * bits)) & mask for j in range(8)], 1)
    return torch.from_numpy(g.reshape(-1)[:n].astype(np.int64))


def code_offset(fmt: str, bits: int) -> int:
    """What pack/unpack adds to / subtracts from the codes of a format to make them unsigned."""
    return code_format(fmt).code_offset(bits)


# ----------------------------------------------------------------------------------- fp16 storage


def fp16_round(t: torch.Tensor, positive: bool = False) -> torch.Tensor:
    """Nearest fp16 value in t's dtype (clamped to fp16's range; positive=True keeps scales > 0)."""
    r = t.detach().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(t.dtype)
    if positive:
        r = r.clamp_min(FP16_MIN_POS)
    return r


def fp16_exact(t: torch.Tensor) -> bool:
    if not t.is_floating_point():
        return True
    return bool(torch.equal(t.detach().to(torch.float16).to(t.dtype), t.detach()))


def is_stored_key(key: str) -> bool:
    """State-dict keys written as plain tensors: not pretraining heads, not quantizer internals."""
    return key.split(".")[0] not in PRETRAINING_HEADS and ".parametrizations." not in key


@torch.no_grad()
def round_to_storage_(model) -> dict:
    """Round, in place, every value the packed file stores at fp16 to its nearest fp16 value, so that the
    evaluated model is exactly the stored one (see the module docstring). `model`: the quantized module, or
    a wrapper holding it as `.model` (an Upstream). Call it after quantization and before evaluation;
    idempotent. Returns {'tensors': number rounded, 'changed': how many changed, 'max_rel_change': largest
    relative change of a tensor (L2)}."""
    model = inner_model(model)
    n, changed, worst = 0, 0, 0.0

    def apply(t: torch.Tensor, positive=False):
        nonlocal n, changed, worst
        if t is None or not t.is_floating_point():
            return
        r = fp16_round(t, positive)
        n += 1
        if not torch.equal(r, t):
            changed += 1
            worst = max(worst, float((r - t).norm() / t.norm().clamp_min(1e-30)))
            t.copy_(r)

    for module in list(quantized_modules(model).values()):
        q = weight_quantizer(module)
        plist = module.parametrizations.weight
        stored = get_method(q.method).storage_form(q, plist.original)
        if stored is not None:
            plist[next(i for i, p in enumerate(plist) if p is q)] = stored
            n += 1
            changed += 1
            continue
        for name, t in list(q.named_parameters()) + list(q.named_buffers()):
            apply(t.data, positive=name in ("scale", "step"))
    for key, t in model.state_dict(keep_vars=True).items():
        if is_stored_key(key):
            apply(t.data)
    return {"tensors": n, "changed": changed, "max_rel_change": worst}


def is_storage_exact(model) -> bool:
    """True when the packed file would hold exactly this model (round_to_storage_ has been applied)."""
    model = inner_model(model)
    for module in quantized_modules(model).values():
        q = weight_quantizer(module)
        if get_method(q.method).storage_form(q, module.parametrizations.weight.original) is not None:
            return False
        for t in list(q.parameters()) + list(q.buffers()):
            if not fp16_exact(t):
                return False
    return all(fp16_exact(t) for k, t in model.state_dict().items() if is_stored_key(k))


__all__ = ["code_offset", "fp16_exact", "fp16_round", "is_storage_exact", "is_stored_key", "pack_codes",
           "packed_nbytes", "round_to_storage_", "unpack_codes"]
