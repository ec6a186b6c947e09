"""Code formats: how a quantizer's integer codes and parameters give its weight, and what the packed file
stores of them. A method's quantizer reports one of these in its parts ('format'); the dequantization
(dequantize_parts), the packing (code offset, stored tensors) and the benchmark's kernels (which grids they
can run) read the format's facts here instead of testing names.

  symmetric  w = q*s, q signed ([-(2^(b-1)-1), 2^(b-1)-1] narrow, or LSQ's [-2^(b-1), 2^(b-1)-1])
  affine     w = (q - z)*s, q in [0, 2^b-1], integer zero point z
  binary     w = (2q - 1)*s, q in {0, 1}
  codebook   w = codebook[q], q in [0, 2^b-1]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import qspeech.quant.functional as Fq


@dataclass(frozen=True)
class CodeFormat:
    name: str
    params: tuple[str, ...]  # tensors stored beside the codes (fp16 in the packed file)
    signed: bool  # signed codes: packing adds 2^(b-1) to make them unsigned
    dequant: Callable  # (grouped codes (R, G, n) in the parameters' dtype, parts) -> grouped weights
    # w = to_signed(q) * s with one scale per group and no zero point (int8 kernels), or None
    to_signed: Callable | None = None
    uniform: bool = True  # an integer grid with scales (and zero points): per-block kernels can run it

    def code_offset(self, bits: int) -> int:
        """What packing adds to the codes to make them unsigned (and unpacking subtracts)."""
        return 2 ** (int(bits) - 1) if self.signed else 0


def _codebook(codes, parts):
    cb = parts["codebook"][:, 0]
    return cb.gather(1, codes[:, 0].long()).unsqueeze(1)


FORMATS = {f.name: f for f in (
    CodeFormat("symmetric", ("scale",), True, lambda c, p: Fq.rtn_dequant(c, p["scale"], None), lambda q: q),
    CodeFormat("affine", ("scale", "zero_point"), False, lambda c, p: Fq.rtn_dequant(c, p["scale"], p["zero_point"])),
    CodeFormat("binary", ("scale",), False, lambda c, p: Fq.binary_dequant(c, p["scale"]), lambda q: 2 * q - 1),
    CodeFormat("codebook", ("codebook",), False, _codebook, uniform=False),
)}


def code_format(parts_or_name) -> CodeFormat:
    name = parts_or_name["format"] if isinstance(parts_or_name, dict) else parts_or_name
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown quantized format {name}") from None


def dequantize_parts(parts: dict) -> torch.Tensor:
    """The fake-quantized weight from `parts` (bit exact with the parametrized forward)."""
    fmt = code_format(parts)
    shape = parts["codes"].shape
    dtype = parts[fmt.params[0]].dtype
    codes = Fq.as_groups(parts["codes"].to(dtype), parts["granularity"], parts.get("group_size") or 128)
    return Fq.from_groups(fmt.dequant(codes, parts), shape)


__all__ = ["FORMATS", "CodeFormat", "code_format", "dequantize_parts"]
