"""FBANK: log-mel features (qspeech.upstream.fbank.Fbank) as the only hidden state; no weights, so no
checkpoint: build_upstream builds it from its arch_cfg whatever model.init says."""

from __future__ import annotations

from qspeech.upstream.fbank import Fbank
from qspeech.upstream.registry import Architecture, register


@register
class FbankArch(Architecture):
    name = "fbank"

    def build_random(self, arch_cfg):
        return Fbank(**dict(arch_cfg)), False

    def hidden_states(self, model, wavs, wav_lens, padding_mask):
        return [model(wavs, wav_lens)]

    def conv_layers(self, model):
        return [(model.n_mels, model.window, model.hop)]  # 20 ms frames like a HuBERT CNN

    def hidden_size(self, model):
        return model.n_mels

    def num_hidden(self, model):
        return 1
