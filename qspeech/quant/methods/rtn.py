"""rtn: round-to-nearest post-training quantization (no data, no training).

1 bit: sign(w) * mean|w| per scale group. Otherwise uniform min-max (or MSE-clipped) ranges:
  symmetric  w = q*s,       q in [-(2^(b-1)-1), 2^(b-1)-1], s = max|w| / (2^(b-1)-1)
  asymmetric w = (q - z)*s, q in [0, 2^b-1], s = (max-min)/(2^b-1), integer zero point z
Storage per scale group: the scale, plus the zero point when asymmetric (1 bit: the mean |w| only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import qspeech.quant.functional as Fq
from qspeech.checks import choice
from qspeech.quant.config import QuantConfig
from qspeech.quant.modules import WeightQuantizer
from qspeech.quant.registry import QuantMethod, register


# the weight range: min-max, or per scale group the clipping ratio with the least squared error
CLIPS = ("minmax", "mse")


@dataclass
class RTNConfig(QuantConfig):
    """conf/quant/rtn.yaml."""

    method: str = "rtn"
    # asymmetric by default: the symmetric narrow range has only 3 levels at 2 bits (see the YAML)
    symmetric: bool = False
    clip: str = "minmax"

    def check_fields(self, method) -> None:
        super().check_fields(method)
        choice(self, "clip", CLIPS)


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


@register
class RTN(QuantMethod):
    name = "rtn"
    config = RTNConfig
    weight_bits = frozenset({1, 2, 3, 4, 8, 16})
    formats = ("symmetric", "affine", "binary")

    def make_weight_quantizer(self, cfg, w, bits):
        return RTNWeight(w, bits, cfg.granularity, cfg.group_size, cfg.symmetric, cfg.clip)

    def scale_values(self, cfg, groups, bits):
        return groups if (bits == 1 or cfg.symmetric) else 2 * groups
