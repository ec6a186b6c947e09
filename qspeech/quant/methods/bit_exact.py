"""bit_exact: BiT as its released code does it (Liu et al., arXiv 2205.13016; facebookresearch/bit
transformer/utils_quant.py, quant_task_distill_glue.py, scripts/run_glue.sh), for the parts a speech upstream
has:

- weights: BwnQuantizer with weight_layerwise=True, sign(W - mean W) * mean|W| with one mean and one scale
  for the whole tensor, the gradient passed to W unchanged. 1-bit weights only (BiT's weight_quant_fn knows
  no other), so bits=1.
- inputs of the quantized modules (act_bits): QuantizeLinear's LearnableBias (one learnable value per input
  channel, initialised 0) then ElasticQuantBinarizerSigned / Unsigned with a learnable alpha initialised by
  AlphaInit (2 mean|x| / sqrt(Qp) signed, 4 mean|x| / sqrt(Qp) unsigned) and BiT's hand-written gradients
  (functional.bit_elastic). Unsigned for the input of the FFN's second linear (`fc2`, after the activation:
  BiT's sym_quant_ffn_attn=False), signed everywhere else (sym_quant_qkvo=True).
- multi-distillation with act_bits and multi_distill: 1-bit weights through activation bits 4 -> 2 -> 1
  (W1A4 -> W1A2 -> W1A1, down to act_bits), each stage taught by the previous stage's model; every stage's
  student starts from the full-precision upstream, as run_glue.sh's STUDENT_MODEL_DIR does. Layer-wise MSE on
  the hidden states (BiT's distill_rep; a speech upstream has no logits).

Not reproduced: BiT also quantizes the attention matmuls' operands (Q, K, V and the softmax probabilities),
which qspeech keeps in full precision (the accounting's attention-matmul row), and its scripts replace GELU by
ReLU in the FFN (HuBERT keeps GELU, so fc2's unsigned input has small negative values that the quantizer maps
to 0 at 1 bit or shifts by the tensor's minimum above). Training hyperparameters are qspeech's (quant.lr, one
Adam for all parameters; BiT uses a separate clip_lr for alpha). Where the weight equals its tensor's mean BiT's
torch.sign gives 0, here +1 (a 1-bit code).

Storage per tensor: mean|W| (1 value), + alpha and one beta per input channel with act_bits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

import qspeech.quant.functional as Fq
from qspeech.checks import need
from qspeech.quant.config import DistillConfig
from qspeech.quant.methods.bit import BinaryWeight, FrozenBinaryWeight
from qspeech.quant.modules import ActQuantizer
from qspeech.quant.registry import QuantMethod, register

# Activation bits of the intermediate stages (BiT's W1A4 -> W1A2 -> W1A1 multi-distillation).
ACT_CHAIN = (4, 2)


@dataclass
class BitExactConfig(DistillConfig):
    """conf/quant/bit_exact.yaml."""

    method: str = "bit_exact"
    granularity: str = "tensor"  # BiT's weight_layerwise=True
    act_bits: int | None = 1  # BiT's fully binarized W1A1
    distill_loss: str = "mse"


class BwnWeight(BinaryWeight):
    """BiT's BwnQuantizer: sign(W - mean W) * mean|W| over the tensor, identity gradient to W (BinaryWeight's
    codes and scale; only the gradient differs)."""

    method = "bit_exact"

    def __init__(self, w, granularity="tensor", group_size=128):
        super().__init__(w, granularity, group_size)

    def forward(self, w):
        return Fq.from_groups(Fq.bwn_fake(self.groups(w)), w.shape)


class FrozenBwnWeight(FrozenBinaryWeight):
    """The storage form of a trained BwnWeight: mean|W| frozen (fp16-representable), same codes."""

    method = "bit_exact"


def act_chain(act_bits: int | None, multi_distill: bool) -> list[int | None]:
    """Activation bits of each stage: 4 -> 2 -> ... down to act_bits (only act_bits without multi_distill)."""
    if act_bits is None or not multi_distill:
        return [act_bits]
    return [b for b in ACT_CHAIN if b > act_bits] + [int(act_bits)]


@register
class BitExact(QuantMethod):
    name = "bit_exact"
    config = BitExactConfig
    weight_bits = frozenset({1})
    act_bits = frozenset({1, 2, 3, 4, 8})
    elastic_act = True
    granularities = ("tensor",)
    symmetric_only = True
    needs_distillation = True
    formats = ("binary",)
    stage_start = "full_precision"

    def check(self, cfg):
        # one beta per input channel: the grouped pos_conv's weight shape does not give its input channels,
        # which the accounting (overhead) needs
        need(cfg.act_bits is None or not {"pos_conv", "all"} & set(cfg.targets), "targets", cfg.targets,
             "with act_bits, bit_exact quantizes linear, cnn, proj or heads inputs, not the grouped pos_conv; "
             "leave pos_conv out or set quant.act_bits=null")

    def make_weight_quantizer(self, cfg, w, bits):
        return BwnWeight(w, cfg.granularity, cfg.group_size)

    def make_act_quantizer(self, cfg, name, module, bits):
        conv = isinstance(module, nn.Conv1d)
        channels = module.in_channels if conv else module.weight.shape[1]
        return ActQuantizer(bits, elastic=True, channels=channels, channel_dim=-2 if conv else -1,
                            signed=name.rsplit(".", 1)[-1] != "fc2")

    def scale_values(self, cfg, groups, bits):
        return groups

    def overhead(self, cfg, weight_shape, groups, bits):
        # alpha and one beta per input channel (BiT's LearnableBias) when the inputs are quantized
        return groups + (1 + int(weight_shape[1]) if cfg.act_bits is not None else 0)

    def distill_plan(self, cfg, bits):
        return [(int(bits), dataclasses.replace(cfg, act_bits=a)) for a in act_chain(cfg.act_bits, cfg.multi_distill)]

    def storage_form(self, quantizer, latent):
        if isinstance(quantizer, BwnWeight):
            return FrozenBwnWeight(latent, quantizer.granularity, quantizer.group_size)
        return None
