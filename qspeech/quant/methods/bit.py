"""bit: qspeech's weight-only BiT variant (Liu et al., arXiv 2205.13016). 1 bit = sign(W - mean W) * mean|W|
per scale group (per output channel by default; STE through the centring and the scale); 2 bits = an LSQ-style
learned step; with act_bits, elastic binarization / quantization of the inputs (learned scalar alpha, beta).
Distilled layer-wise (MSE) from the full-precision upstream; at 1 bit through the chain full precision ->
2-bit LSQ -> 1 bit (each stage taught by, and started from, the previous model): a chain over *weight* bits,
the quantity the paper's storage and runtime accounting counts. BiT's own recipe (one scale per tensor, its
elastic activation quantizer, the chain over activation bits) is quant=bit_exact (methods/bit_exact.py).
Storage per scale group: mean |W| (1 bit) or the step (2 bits), +2 per tensor (alpha, beta) with act_bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import qspeech.quant.functional as Fq
from qspeech.quant.config import DistillConfig
from qspeech.quant.methods.lsq import LSQWeight
from qspeech.quant.modules import WeightQuantizer
from qspeech.quant.packing import fp16_round
from qspeech.quant.registry import QuantMethod, register


@dataclass
class BitConfig(DistillConfig):
    """conf/quant/bit.yaml."""

    method: str = "bit"
    distill_loss: str = "mse"


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


class FrozenBinaryWeight(WeightQuantizer):
    """BiT's 1-bit weights, sign(W - mean W) * s, with s = mean|W| frozen into a buffer (fp16-representable)
    so that it can be stored: the storage form of a trained BinaryWeight (made by round_to_storage_); same
    codes."""

    method = "bit"

    def __init__(self, w, granularity="channel", group_size=128):
        super().__init__(w.shape, 1, granularity, group_size)
        self.register_buffer("scale", fp16_round(Fq.binary_scale(self.groups(w.detach())), positive=True))

    def forward(self, w):
        wg = self.groups(w)
        return Fq.from_groups(Fq.binary_fake(wg, self.scale, center=True), w.shape)

    def parts(self, w):
        wg = self.groups(w.detach())
        return {**self._meta(), "format": "binary",
                "codes": Fq.from_groups(Fq.binary_codes(wg, center=True), w.shape).to(torch.int32),
                "scale": self.scale.clone()}


class BitMultiWeight(LSQWeight):
    """BiT's multi-bit weights: LSQ-style learned scale per group."""

    method = "bit"


@register
class Bit(QuantMethod):
    name = "bit"
    config = BitConfig
    weight_bits = frozenset({1, 2})
    act_bits = frozenset({1, 2, 3, 4, 8})
    elastic_act = True
    symmetric_only = True
    needs_distillation = True
    formats = ("binary", "symmetric")

    def make_weight_quantizer(self, cfg, w, bits):
        if bits == 1:
            return BinaryWeight(w, cfg.granularity, cfg.group_size)
        return BitMultiWeight(w, bits, cfg.granularity, cfg.group_size, cfg.grad_scale_n)

    def scale_values(self, cfg, groups, bits):
        return groups + (2 if cfg.act_bits is not None else 0)

    def distill_stages(self, cfg, bits):
        return [2, 1] if bits == 1 and cfg.multi_distill else [int(bits)]

    def storage_form(self, quantizer, latent):
        if isinstance(quantizer, BinaryWeight):
            return FrozenBinaryWeight(latent, quantizer.granularity, quantizer.group_size)
        return None
