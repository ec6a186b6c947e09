"""s3prl's Featurizer: the learnable weighted sum of an upstream's hidden states every task's head starts with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Featurizer(nn.Module):
    """Softmax-weighted sum of all hidden states (s3prl's Featurizer, weights initialised to 0 = uniform)."""

    def __init__(self, num_layers: int, normalize: bool = False):
        super().__init__()
        self.normalize = normalize
        self.weights = nn.Parameter(torch.zeros(num_layers))

    def layer_weights(self) -> list[float]:
        return F.softmax(self.weights.detach().float(), dim=-1).tolist()

    def forward(self, hs: torch.Tensor) -> torch.Tensor:
        """hs: (B, F, L, D) -> (B, F, D)."""
        if self.normalize:
            hs = F.layer_norm(hs, hs.shape[-1:])
        w = F.softmax(self.weights, dim=-1).to(hs.dtype)
        return torch.einsum("bfld,l->bfd", hs, w)
