"""Fake-quantization parametrizations (registered on `.weight` with torch.nn.utils.parametrize, so the
weight stays a plain tensor for F.multi_head_attention_forward) and activation quantizers (run by a
forward pre-hook on the quantized module).

Each weight quantizer has `forward(w) -> fake-quantized w` and `parts(w) -> dict` giving the integer
codes and the parameters exactly as the forward uses them; `dequantize_parts(parts)` rebuilds the
forward's weight bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qspeech.quant import functional as Fq


class WeightQuantizer(nn.Module):
    method = "base"

    def __init__(self, shape, bits: int, granularity: str, group_size: int):
        super().__init__()
        self.shape = tuple(shape)
        self.bits = int(bits)
        self.granularity = granularity
        self.group_size = int(group_size)

    def groups(self, w):
        return Fq.as_groups(w, self.granularity, self.group_size)

    def extra_repr(self):
        return f"bits={self.bits}, granularity={self.granularity}" + (
            f", group_size={self.group_size}" if self.granularity == "group" else "")

    def _meta(self):
        return {"method": self.method, "bits": self.bits, "granularity": self.granularity,
                "group_size": self.group_size if self.granularity == "group" else None, "shape": self.shape}

    def right_inverse(self, w):  # assigning to .weight sets the latent weight
        return w


class RTNWeight(WeightQuantizer):
    """Round to nearest with scales (and zero points) fixed from the weights at registration."""

    method = "rtn"

    def __init__(self, w, bits, granularity="channel", group_size=128, symmetric=True, clip="minmax"):
        super().__init__(w.shape, bits, granularity, group_size)
        self.symmetric = bool(symmetric) or self.bits == 1
        wg = self.groups(w.detach())
        if self.bits == 1:
            scale, zero = Fq.binary_scale(wg), None
        else:
            scale, zero = Fq.rtn_params(wg, self.bits, self.symmetric, clip)
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", zero.clone() if zero is not None else None)

    def forward(self, w):
        wg = self.groups(w)
        if self.bits == 1:
            return Fq.from_groups(Fq.binary_fake(wg, self.scale, center=False), w.shape)
        return Fq.from_groups(Fq.rtn_fake(wg, self.scale, self.zero_point, self.bits), w.shape)

    def parts(self, w):
        wg = self.groups(w.detach())
        if self.bits == 1:
            codes, fmt = Fq.binary_codes(wg, center=False), "binary"
        else:
            codes = Fq.rtn_codes(wg, self.scale, self.zero_point, self.bits)
            fmt = "affine" if self.zero_point is not None else "symmetric"
        return {**self._meta(), "format": fmt, "codes": Fq.from_groups(codes, w.shape).to(torch.int32),
                "scale": self.scale.clone(), "zero_point": None if self.zero_point is None else self.zero_point.clone()}


class KMeansWeight(WeightQuantizer):
    """Non-uniform: 2^b k-means levels per tensor or per output channel; nearest-level STE."""

    method = "kmeans"

    def __init__(self, w, bits, granularity="channel", iters=30, seed=0):
        super().__init__(w.shape, bits, granularity, 0)
        wg = self.groups(w.detach())
        cb, _ = Fq.kmeans_1d(wg[:, 0], 2**self.bits, iters, seed)
        self.register_buffer("codebook", cb.to(w.dtype))

    def forward(self, w):
        return Fq.from_groups(Fq.codebook_fake(self.groups(w), self.codebook), w.shape)

    def parts(self, w):
        wg = self.groups(w.detach())
        codes = Fq.codebook_assign(wg[:, 0], self.codebook).unsqueeze(1)
        return {**self._meta(), "format": "codebook", "codes": Fq.from_groups(codes, w.shape).to(torch.int32),
                "codebook": self.codebook.clone().unsqueeze(1)}  # (R, 1, 2^b)


class LSQWeight(WeightQuantizer):
    """Learned step size per scale group, signed range [-2^(b-1), 2^(b-1)-1]."""

    method = "lsq"

    def __init__(self, w, bits, granularity="channel", group_size=128):
        super().__init__(w.shape, bits, granularity, group_size)
        wg = self.groups(w.detach())
        self.step = nn.Parameter(Fq.lsq_init_step(wg, self.bits).clone())
        self.g = Fq.lsq_grad_scale(wg.shape[-1], self.bits)

    def forward(self, w):
        return Fq.from_groups(Fq.lsq_fake(self.groups(w), self.step, self.bits, self.g), w.shape)

    def parts(self, w):
        qn, qp = Fq.signed_range(self.bits)
        codes = Fq.lsq_codes(self.groups(w.detach()), self.step.detach(), qn, qp)
        return {**self._meta(), "format": "symmetric", "codes": Fq.from_groups(codes, w.shape).to(torch.int32),
                "scale": self.step.detach().clone(), "zero_point": None}


class BinaryWeight(WeightQuantizer):
    """BiT / BWN 1 bit: sign(W - mean W) * mean|W| per scale group, identity STE."""

    method = "bit"

    def __init__(self, w, granularity="channel", group_size=128):
        super().__init__(w.shape, 1, granularity, group_size)

    def forward(self, w):
        wg = self.groups(w)
        return Fq.from_groups(Fq.binary_fake(wg, Fq.binary_scale(wg), center=True), w.shape)

    def parts(self, w):
        wg = self.groups(w.detach())
        return {**self._meta(), "format": "binary",
                "codes": Fq.from_groups(Fq.binary_codes(wg, center=True), w.shape).to(torch.int32),
                "scale": Fq.binary_scale(wg).clone()}


class BitMultiWeight(LSQWeight):
    """BiT's multi-bit weights: LSQ-style learned scale per group."""

    method = "bit"


def dequantize_parts(parts: dict) -> torch.Tensor:
    """The fake-quantized weight from `parts` (bit exact with the parametrized forward)."""
    shape = parts["codes"].shape
    scale = parts.get("scale")
    granularity, gs = parts["granularity"], parts.get("group_size") or 128
    codes = Fq.as_groups(parts["codes"].to(scale.dtype if scale is not None else parts["codebook"].dtype),
                         granularity, gs)
    fmt = parts["format"]
    if fmt == "binary":
        w = Fq.binary_dequant(codes, scale)
    elif fmt in ("symmetric", "affine"):
        w = Fq.rtn_dequant(codes, scale, parts.get("zero_point"))
    elif fmt == "codebook":
        cb = parts["codebook"][:, 0]
        w = cb.gather(1, codes[:, 0].long()).unsqueeze(1)
    else:
        raise ValueError(f"unknown quantized format {fmt}")
    return Fq.from_groups(w, shape)


# ----------------------------------------------------------------------------------- activations


class ActQuantizer(nn.Module):
    """Quantizes a module's input. lsq: signed LSQ step (elastic=False, beta fixed 0); bit: BiT's
    elastic alpha/beta, unsigned when the first batch seen is non-negative. Initialised from the first
    batch it sees (alpha = mean|x| at 1 bit, else 2 mean|x| / sqrt(Qp)); `initialized` is saved with it."""

    def __init__(self, bits: int, elastic: bool):
        super().__init__()
        self.bits = int(bits)
        self.elastic = bool(elastic)
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.beta = nn.Parameter(torch.tensor(0.0), requires_grad=self.elastic)
        self.register_buffer("signed", torch.tensor(True))
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self):
        return f"bits={self.bits}, elastic={self.elastic}"

    @torch.no_grad()
    def _init(self, x):
        self.signed.fill_(bool(not self.elastic or x.min() < -1e-5))
        m = x.abs().mean().clamp_min(1e-8)
        if self.bits == 1:
            a = m
        else:
            qp = 2 ** (self.bits - 1) - 1 if bool(self.signed) else 2**self.bits - 1
            a = 2 * m / math.sqrt(qp)
        self.alpha.fill_(float(a))
        self.beta.zero_()
        self.initialized.fill_(True)

    def forward(self, x):
        if not bool(self.initialized):
            self._init(x.detach())
        signed = bool(self.signed)
        qp = (2 ** (self.bits - 1) - 1 if signed else 2**self.bits - 1) if self.bits > 1 else 1
        g = 1.0 / math.sqrt(x.numel() * qp)
        return Fq.elastic_quant(x, self.alpha.abs().clamp_min(1e-8), self.beta, self.bits, signed, g)


def input_quant_hook(module, args):
    if not args:
        return None
    return (module.input_quant(args[0]),) + tuple(args[1:])
