"""lsq: LSQ (Esser et al., arXiv 1902.08153), a learned step size per scale group,
q = round(clip(w/s, -2^(b-1), 2^(b-1)-1)) * s, trained by layer-wise distillation of the full-precision
upstream's hidden states on the task's unlabeled training audio. With act_bits, the inputs of the quantized
modules get a learned LSQ step too. Storage per scale group: the step (+1 activation step per tensor).
The step's gradient scale g = 1/sqrt(N * Qp) takes N from quant.grad_scale_n: the weights sharing the step
('row', default) or the layer's N_W ('layer', the paper's)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import qspeech.quant.functional as Fq
from qspeech.quant.config import DistillConfig
from qspeech.quant.modules import WeightQuantizer
from qspeech.quant.registry import QuantMethod, register


@dataclass
class LSQConfig(DistillConfig):
    """conf/quant/lsq.yaml."""

    method: str = "lsq"


class LSQWeight(WeightQuantizer):
    """Learned step size per scale group, signed range [-2^(b-1), 2^(b-1)-1]."""

    method = "lsq"

    def __init__(self, w, bits, granularity="channel", group_size=128, grad_scale_n="row"):
        super().__init__(w.shape, bits, granularity, group_size)
        wg = self.groups(w.detach())
        self.step = nn.Parameter(Fq.lsq_init_step(wg, self.bits).clone())
        self.g = Fq.lsq_grad_scale(Fq.lsq_grad_scale_n(w, wg, grad_scale_n), self.bits)

    def forward(self, w):
        return Fq.from_groups(Fq.lsq_fake(self.groups(w), self.step, self.bits, self.g), w.shape)

    def parts(self, w):
        qn, qp = Fq.signed_range(self.bits)
        codes = Fq.lsq_codes(self.groups(w.detach()), self.step.detach(), qn, qp)
        return {**self._meta(), "format": "symmetric", "codes": Fq.from_groups(codes, w.shape).to(torch.int32),
                "scale": self.step.detach().clone(), "zero_point": None}


@register
class LSQ(QuantMethod):
    name = "lsq"
    config = LSQConfig
    weight_bits = frozenset({2, 3, 4, 8})
    act_bits = frozenset({2, 3, 4, 8})
    symmetric_only = True
    needs_distillation = True
    formats = ("symmetric",)

    def make_weight_quantizer(self, cfg, w, bits):
        return LSQWeight(w, bits, cfg.granularity, cfg.group_size, cfg.grad_scale_n)

    def scale_values(self, cfg, groups, bits):
        return groups + (1 if cfg.act_bits is not None else 0)
