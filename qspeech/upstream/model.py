"""The Upstream: an s3prl model that maps padded 16 kHz waveforms to all its hidden states."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qspeech.upstream.registry import Architecture, get_arch

SAMPLE_RATE = 16_000


@dataclass
class UpstreamOutput:
    hidden_states: list[torch.Tensor]  # each (B, frames, D)
    lengths: torch.Tensor  # (B,) valid frames per utterance


@dataclass
class UpstreamSpec:
    """What identifies the weights: enough to rebuild the model and to key caches."""

    name: str
    arch: str
    arch_cfg: dict = field(default_factory=dict)
    source: str = "random"  # file the weights came from, or "random"
    source_sha256: str | None = None


class Upstream(nn.Module):
    """Wraps an upstream model (s3prl's classes, or FBANK's). `model` is the module whose weights quantizers
    and accounting see; its architecture (spec.arch, qspeech.upstream.archs) says what its hidden states are.

    Hidden states follow s3prl's experts exactly: for HuBERT / wav2vec 2.0 / WavLM the input of each
    transformer layer plus the encoder output (13 for Base); for DistilHuBERT the CNN projection, each
    layer's output and each prediction head; for FBANK its log-mel features.
    """

    def __init__(self, model: nn.Module, spec: UpstreamSpec, normalize: bool = False):
        super().__init__()
        self.model = model
        self.spec = spec
        self.normalize = normalize
        if hasattr(model, "encoder"):  # s3prl transformers (not DistilHuBERT's, nor FBANK)
            model.encoder.layerdrop = 0.0
        # s3prl's experts run the CNN without autograd; QAT turns this back on (cnn_grad=True).
        self.cnn_grad = False
        self.eval()

    @property
    def architecture(self) -> Architecture:
        return get_arch(self.spec.arch)

    @property
    def conv_layers(self) -> list[tuple[int, int, int]]:
        return self.architecture.conv_layers(self.model)

    @property
    def downsample_rate(self) -> int:
        rate = 1
        for _, _, s in self.conv_layers:
            rate *= s
        return rate

    @property
    def hidden_size(self) -> int:
        return self.architecture.hidden_size(self.model)

    @property
    def num_hidden(self) -> int:
        return self.architecture.num_hidden(self.model)

    def frame_lengths(self, wav_lens: torch.Tensor) -> torch.Tensor:
        n = wav_lens.clone()
        for _, k, s in self.conv_layers:
            n = torch.div(n - k, s, rounding_mode="floor") + 1
        return n.clamp(min=0)

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None) -> UpstreamOutput:
        """wavs: (B, T) float32 at 16 kHz, zero-padded; wav_lens: (B,) samples."""
        if wavs.dim() == 1:
            wavs = wavs.unsqueeze(0)
        if wav_lens is None:
            wav_lens = torch.full((wavs.shape[0],), wavs.shape[1], dtype=torch.long, device=wavs.device)
        wav_lens = wav_lens.to(wavs.device)
        valid = torch.arange(wavs.shape[1], device=wavs.device)[None, :] < wav_lens[:, None]
        if self.normalize:  # per utterance over its valid samples, then zero padding, as s3prl
            wavs = torch.stack(
                [torch.cat([F.layer_norm(w[:n], (n,)), w[n:] * 0]) for w, n in zip(wavs, wav_lens.tolist())]
            )
        if hasattr(self.model, "feature_grad_mult"):
            self.model.feature_grad_mult = 1.0 if self.cnn_grad else 0.0

        states = self.architecture.hidden_states(self.model, wavs, wav_lens, ~valid)
        frames = min(s.shape[1] for s in states)
        states = [s[:, :frames] for s in states]
        return UpstreamOutput(states, self.frame_lengths(wav_lens).clamp(max=frames))
