"""A throwaway architecture, written as a new one would be: this module in qspeech/upstream/archs/ (the test
puts this folder on that package's path) plus conf/model/toy.yaml. A small CNN and two residual MLP
blocks, its own checkpoint format (toy_cfg, toy_weights); no s3prl."""

from __future__ import annotations

import torch
from torch import nn

from qspeech.upstream.registry import Architecture, register


class Block(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.layer_norm(x))))


class ToyNet(nn.Module):
    """(B, T) -> the CNN's frames, then each block's output; module names follow s3prl's (feature_extractor,
    encoder.layers.N.fc1) so that quant.targets' kinds (cnn, linear) find them."""

    def __init__(self, dim: int = 32, ffn: int = 64, layers: int = 2):
        super().__init__()
        self.feature_extractor = nn.Sequential(nn.Conv1d(1, dim, 10, 5), nn.GELU(), nn.Conv1d(dim, dim, 8, 64))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(Block(dim, ffn) for _ in range(layers))

    def forward(self, wavs):
        x = self.feature_extractor(wavs[:, None]).transpose(1, 2)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return states


@register
class Toy(Architecture):
    name = "toy"
    checkpoint_format = "toy"
    checkpoint_keys = ("toy_cfg", "toy_weights")
    weights_key = "toy_weights"

    def build_random(self, arch_cfg):
        return ToyNet(**arch_cfg), False

    def build_from_state(self, state):
        return ToyNet(**state["toy_cfg"]), state["toy_weights"], False

    def to_state(self, model, weights, arch_cfg, extra):
        return {"toy_cfg": dict(arch_cfg), "toy_weights": weights}

    def hidden_states(self, model, wavs, wav_lens, padding_mask):
        return model(wavs)

    def conv_layers(self, model):
        return [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in model.feature_extractor
                if isinstance(c, nn.Conv1d)]

    def hidden_size(self, model):
        return model.encoder.layers[0].fc1.in_features

    def num_hidden(self, model):
        return len(model.encoder.layers) + 1
