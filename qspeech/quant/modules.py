"""The base of the fake-quantization parametrizations (registered on `.weight` with
torch.nn.utils.parametrize, so the weight stays a plain tensor for F.multi_head_attention_forward) and the
activation quantizers (run by a forward pre-hook on the quantized module). Each method's weight quantizer
lives in its module, qspeech/quant/methods/<name>.py.

Each weight quantizer has `forward(w) -> fake-quantized w` and `parts(w) -> dict` giving the integer
codes and the parameters exactly as the forward uses them; `formats.dequantize_parts(parts)` rebuilds
the forward's weight bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import qspeech.quant.functional as Fq


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
