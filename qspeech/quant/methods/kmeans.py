"""kmeans: non-uniform post-training quantization. 2^b k-means levels (k-means++ init, Lloyd iterations,
deterministic for a seed) per output channel or per tensor; weights snap to the nearest level (identity
straight-through gradient). Storage per scale group: its codebook of 2^b levels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import qspeech.quant.functional as Fq
from qspeech.checks import integer
from qspeech.quant.config import QuantConfig
from qspeech.quant.modules import WeightQuantizer
from qspeech.quant.registry import QuantMethod, register


@dataclass
class KMeansConfig(QuantConfig):
    """conf/quant/kmeans.yaml."""

    method: str = "kmeans"
    iters: int = 30  # Lloyd iterations (stops early when the levels stop moving)
    seed: int = 0

    def check_fields(self, method) -> None:
        super().check_fields(method)
        integer(self, "iters", 1)
        integer(self, "seed", 0)


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


@register
class KMeans(QuantMethod):
    name = "kmeans"
    config = KMeansConfig
    weight_bits = frozenset({1, 2, 3, 4, 8})
    granularities = ("tensor", "channel")
    formats = ("codebook",)

    def make_weight_quantizer(self, cfg, w, bits):
        return KMeansWeight(w, bits, cfg.granularity, cfg.iters, cfg.seed)

    def scale_values(self, cfg, groups, bits):
        return groups * 2**bits
