"""FBANK: log-mel filterbank features as a parameter-free "upstream", SUPERB's leaderboard baseline.

80 Kaldi-style log-mel energies (DC removal, pre-emphasis 0.97, Povey window, mel filters 20 Hz - 8 kHz),
framed like HuBERT's CNN (window 400 / hop 320 samples: 25 / 20 ms) so that an utterance gives exactly as
many frames as a 20 ms upstream and the same downstream head (frame_stride, BiLSTM) applies unchanged;
per-utterance mean and variance normalisation over the valid frames (s3prl's fbank baseline applies CMVN).
It has no weights: nothing to quantize, no storage, and its MACs are not counted. Its architecture (hidden
states, frames) is qspeech/upstream/archs/fbank.py.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

from qspeech.upstream.model import SAMPLE_RATE


def _mel(hz):
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=8)
def kaldi_mel_banks(n_mels: int, n_fft: int, sr: int = SAMPLE_RATE, low: float = 20.0, high: float = 0.0) -> np.ndarray:
    """Kaldi's triangular filters on the mel scale: (n_mels, n_fft // 2 + 1), float64 (also the MFCCs' of
    qspeech.pretrain.mfcc)."""
    high = high if high > 0 else sr / 2 + high
    mel_lo, mel_hi = _mel(low), _mel(high)
    delta = (mel_hi - mel_lo) / (n_mels + 1)
    fft_mel = _mel(np.arange(n_fft // 2 + 1) * sr / n_fft)
    m = np.arange(n_mels)[:, None]
    left, center, right = mel_lo + m * delta, mel_lo + (m + 1) * delta, mel_lo + (m + 2) * delta
    up = (fft_mel[None] - left) / (center - left)
    down = (right - fft_mel[None]) / (right - center)
    return np.maximum(0.0, np.minimum(up, down))


class Fbank(nn.Module):
    """(B, T) waveforms -> (B, frames, n_mels) normalised log-mel features; frames = (T - window) // hop + 1."""

    def __init__(self, n_mels: int = 80, window: int = 400, hop: int = 320, preemph: float = 0.97, cmvn: bool = True):
        super().__init__()
        self.n_mels, self.window, self.hop, self.preemph, self.cmvn = n_mels, window, hop, preemph, cmvn
        self.n_fft = 1 << (window - 1).bit_length()
        povey = (0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(window) / (window - 1))) ** 0.85
        self.register_buffer("povey", povey.float(), persistent=False)
        self.register_buffer("banks", torch.from_numpy(kaldi_mel_banks(n_mels, self.n_fft)).float(), persistent=False)

    def frames(self, n_samples: torch.Tensor) -> torch.Tensor:
        return (torch.div(n_samples - self.window, self.hop, rounding_mode="floor") + 1).clamp(min=0)

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor) -> torch.Tensor:
        x = wavs.float().unfold(1, self.window, self.hop)  # (B, F, window)
        x = x - x.mean(-1, keepdim=True)
        x = torch.cat([x[..., :1] * (1 - self.preemph), x[..., 1:] - self.preemph * x[..., :-1]], dim=-1)
        power = torch.fft.rfft(x * self.povey, n=self.n_fft).abs().pow(2)
        feats = torch.log(torch.clamp(power @ self.banks.T, min=torch.finfo(torch.float32).eps))
        if not self.cmvn:
            return feats
        n = self.frames(wav_lens).clamp(min=1, max=feats.shape[1])
        valid = (torch.arange(feats.shape[1], device=feats.device)[None] < n[:, None]).unsqueeze(-1)
        mean = (feats * valid).sum(1, keepdim=True) / n[:, None, None]
        var = (((feats - mean) * valid) ** 2).sum(1, keepdim=True) / n[:, None, None]
        return ((feats - mean) / torch.sqrt(var + 1e-5)) * valid
