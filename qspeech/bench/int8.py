"""8 bits with torch's dynamic int8 kernel (fbgemm, W8A8): the quantized linears (and optionally the CNN's
convolutions, as unfold + the same kernel) of a copy of the full-precision upstream."""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DQLinear

from qspeech.quant import clone_model, quantized_modules, quantized_weight_parts
from qspeech.quant.api import force_projection_calls
from qspeech.quant.formats import code_format


def int8_weight(parts: dict | None, weight: torch.Tensor) -> tuple[torch.Tensor, str]:
    """A torch per-channel/per-tensor qint8 weight: the model's own codes when its grid allows (w = q*s with
    one scale per channel or per tensor, 1-bit +-s included), else per-channel minmax of `weight`."""
    fmt = code_format(parts) if parts is not None else None
    if fmt is not None and fmt.to_signed is not None and parts["granularity"] in ("channel", "tensor"):
        codes = fmt.to_signed(parts["codes"].to(torch.int64))
        codes = codes.reshape(codes.shape[0], -1).to(torch.int8)
        scale = parts["scale"].reshape(-1).double()
        if parts["granularity"] == "tensor":
            return torch._make_per_tensor_quantized_tensor(codes, float(scale[0]), 0), "own codes, per tensor"
        zp = torch.zeros(codes.shape[0], dtype=torch.long)
        return torch._make_per_channel_quantized_tensor(codes, scale, zp, 0), "own codes, per channel"
    w = weight.detach().float().reshape(weight.shape[0], -1)
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
    q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    return q, "torch per-channel symmetric minmax of the fake-quant weights (not the model's grid)"


def _dq_linear(weight_q: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    out_f, in_f = weight_q.shape[0], weight_q.shape[1]
    m = DQLinear(in_f, out_f, bias_=bias is not None, dtype=torch.qint8)
    m.set_weight_bias(weight_q, None if bias is None else bias.detach().float())
    return m


class UnfoldInt8Conv1d(nn.Module):
    """Conv1d (no padding, no groups, no dilation) as unfold + a dynamic int8 Linear."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.k, self.s = conv.kernel_size[0], conv.stride[0]
        # what Upstream.conv_layers reads
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        q, self.weights = int8_weight(None, conv.weight.detach().reshape(conv.out_channels, -1))
        self.linear = _dq_linear(q, conv.bias)

    def forward(self, x):  # (B, C, T)
        cols = x.unfold(2, self.k, self.s).permute(0, 2, 1, 3).reshape(x.shape[0], -1, x.shape[1] * self.k)
        return self.linear(cols).transpose(1, 2)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _int8_cnn_(up, grids: set) -> None:
    """The CNN front end's convolutions (all but the first, 1-channel one) as UnfoldInt8Conv1d, in place."""
    for block in up.model.feature_extractor.conv_layers:
        conv = block[0]
        if isinstance(conv, nn.Conv1d) and conv.in_channels > 1 and conv.groups == 1 and conv.padding[0] == 0 \
                and conv.dilation[0] == 1:
            block[0] = UnfoldInt8Conv1d(conv)
            grids.add("CNN: " + block[0].weights)


def int8_upstream(upstream_fp, quantized, cnn: bool = False):
    """A copy of the fp upstream whose quantized linears (those of `quantized`, a fake-quantized upstream
    with the same architecture) run torch's dynamic int8 kernel; cnn=True also the CNN convolutions."""
    up = clone_model(upstream_fp)
    up.requires_grad_(False)
    grids = set()
    qmods = quantized_modules(quantized)
    names = [n for n, m in qmods.items() if isinstance(m, nn.Linear)]
    for name in names:
        mod = qmods[name]
        q, how = int8_weight(quantized_weight_parts(mod), mod.weight)
        grids.add(how)
        _set_module(up.model, name, _dq_linear(q, mod.bias))
    force_projection_calls(up.model, names)
    if cnn:
        _int8_cnn_(up, grids)
    return up, "; ".join(sorted(grids))
