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
    """Quantizes a module's input. lsq: signed LSQ step (elastic=False, beta fixed 0); bit: BiT-style
    elastic alpha/beta, unsigned when the first batch seen is non-negative. Initialised from the first
    batch it sees (alpha = mean|x| at 1 bit, else 2 mean|x| / sqrt(Qp)); `initialized` is saved with it.

    channels=C (bit_exact): BiT's own quantizer (utils_quant.py): x - beta with beta one learnable value per
    input channel (BiT's LearnableBias, beta = -its bias; shaped (C,) for a Linear's (..., C) input, (C, 1) for a
    conv's (B, C, T)), BiT's elastic binarizer and gradients (functional.bit_elastic), alpha initialised by
    BiT's AlphaInit, signedness fixed by the module's role (`signed`). A per-channel beta marks this variant, so
    a state dict alone rebuilds it (a packed file's loader builds the default one and loads the state)."""

    def __init__(self, bits: int, elastic: bool, channels: int | None = None, channel_dim: int = -1,
                 signed: bool = True):
        super().__init__()
        self.bits = int(bits)
        self.elastic = bool(elastic) or channels is not None
        self.alpha = nn.Parameter(torch.tensor(1.0))
        shape = () if channels is None else (int(channels),) + (1,) * (-1 - channel_dim)
        self.beta = nn.Parameter(torch.zeros(shape), requires_grad=self.elastic)
        self.register_buffer("signed", torch.tensor(bool(signed) if channels is not None else True))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def bit_exact(self) -> bool:
        return self.beta.dim() > 0

    def extra_repr(self):
        return f"bits={self.bits}, elastic={self.elastic}" + (", bit_exact" if self.bit_exact else "")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        beta = state_dict.get(prefix + "beta")
        if beta is not None and beta.shape != self.beta.shape:  # the saved quantizer was the other variant
            self.elastic = self.elastic or beta.dim() > 0
            self.beta = nn.Parameter(torch.zeros_like(beta), requires_grad=self.elastic)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def alpha_value(self) -> torch.Tensor:
        """alpha as the forward uses it."""
        if self.bit_exact:
            a = self.alpha.detach()
            return torch.where(a > Fq.BIT_ALPHA_EPS, a, torch.full_like(a, Fq.BIT_ALPHA_EPS))
        return self.alpha.detach().abs().clamp_min(1e-8)

    @torch.no_grad()
    def _init(self, x):
        if self.bit_exact:  # BiT's AlphaInit on its quantizer's input (beta is 0 at init)
            self.alpha.fill_(Fq.bit_init_alpha(x - self.beta, self.bits, bool(self.signed)))
            self.initialized.fill_(True)
            return
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
        if self.bit_exact:
            return Fq.bit_elastic(x - self.beta, self.alpha, self.bits, signed)
        qp = (2 ** (self.bits - 1) - 1 if signed else 2**self.bits - 1) if self.bits > 1 else 1
        g = 1.0 / math.sqrt(x.numel() * qp)
        return Fq.elastic_quant(x, self.alpha.abs().clamp_min(1e-8), self.beta, self.bits, signed, g)


def input_quant_hook(module, args):
    if not args:
        return None
    return (module.input_quant(args[0]),) + tuple(args[1:])
