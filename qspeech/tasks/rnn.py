"""A bidirectional LSTM over padded batches that gives exactly what nn.LSTM gives on packed sequences,
about 2.5x faster on CPU (benchmarks/bench_head.py).

PyTorch's fast CPU LSTM kernel (oneDNN) does not take PackedSequence, and a bidirectional nn.LSTM on padded
input would start its backward direction in the padding. Instead each direction is a unidirectional LSTM on
padded input: the backward one reads every sequence reversed within its own length, so padding only ever
trails the valid frames and never reaches them; padded outputs are zero, as pad_packed_sequence leaves them.

On CUDA the same parameters run through cuDNN's fused bidirectional kernel on packed sequences instead (the
two directions at once, not one after the other), and always in float32: under autocast PyTorch runs cuDNN's
LSTM in float16, which the head's unscaled CTC loss does not survive. tests/test_asr.py checks that both paths
compute the same function.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def reverse_index(lens: torch.Tensor, total: int) -> torch.Tensor:
    """(B, total) time indices that reverse each row's first lens[b] frames and keep the rest in place."""
    t = torch.arange(total, device=lens.device)[None, :]
    n = lens.to(t.device)[:, None]
    return torch.where(t < n, n - 1 - t, t)


def gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[2]))


class BiLSTM(nn.Module):
    """One bidirectional LSTM layer (batch first): (B, T, in) and lengths -> (B, T, 2 * hidden).

    fused: None picks cuDNN's fused kernel on CUDA and the two unidirectional passes elsewhere; True / False
    force one (the parameters, and so the checkpoints, are the same either way)."""

    def __init__(self, input_size: int, hidden_size: int, fused: bool | None = None):
        super().__init__()
        self.fwd = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.bwd = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.fused = fused
        # A weightless template for the fused call (meta device: no memory); kept out of the module tree so
        # that state_dict and .to() see fwd and bwd only.
        self._template = (nn.LSTM(input_size, hidden_size, batch_first=True, bidirectional=True, device="meta"),)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        if self.fused if self.fused is not None else x.is_cuda:
            with torch.autocast(x.device.type, enabled=False):
                return self._fused_forward(x.float(), lens)
        return self._two_pass_forward(x, lens)

    def _fused_forward(self, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        params = {f"{name}{suffix}": p for suffix, lstm in (("", self.fwd), ("_reverse", self.bwd))
                  for name, p in lstm.named_parameters()}
        packed = pack_padded_sequence(x, lens.cpu(), batch_first=True, enforce_sorted=False)
        with warnings.catch_warnings():  # cuDNN copies the two directions' weights into one block per call
            warnings.filterwarnings("ignore", message=".*not part of single contiguous chunk of memory.*")
            out, _ = functional_call(self._template[0], params, (packed,))
        return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]

    def _two_pass_forward(self, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        total = x.shape[1]
        index = reverse_index(lens, total)
        forward, _ = self.fwd(x)
        backward, _ = self.bwd(gather_time(x, index))
        y = torch.cat([forward, gather_time(backward, index)], dim=-1)
        valid = torch.arange(total, device=x.device)[None, :, None] < lens.to(x.device)[:, None, None]
        return y * valid


class LSTM(nn.Module):
    """One forward-only LSTM layer with BiLSTM's interface (padded outputs zero)."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.fwd = nn.LSTM(input_size, hidden_size, batch_first=True)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        y, _ = self.fwd(x)
        valid = torch.arange(x.shape[1], device=x.device)[None, :, None] < lens.to(x.device)[:, None, None]
        return y * valid
