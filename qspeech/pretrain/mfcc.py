"""MFCC (+deltas) at the upstream's own frame rate, in numpy (no torchaudio).

Kaldi-style MFCCs (DC removal, pre-emphasis, Povey window, log mel filterbank, DCT-II, liftering, as
fairseq's HuBERT `dump_mfcc_feature.py` computes with torchaudio's kaldi compliance module), but framed
with the CNN's receptive field as window and its total stride as hop (400 / 320 samples = 25 / 20 ms for
HuBERT's CNN), with "snip edges": then an utterance of n samples gives exactly as many MFCC frames as the
CNN gives hidden frames, floor((n - 400) / 320) + 1, and frame t of both covers the same samples.
"""

from __future__ import annotations

import ast
import functools

import numpy as np

from qspeech.upstream.fbank import kaldi_mel_banks

SAMPLE_RATE = 16_000


def conv_layers(conv_feature_layers: str) -> list[tuple[int, int, int]]:
    """Parse s3prl's `conv_feature_layers` string, e.g. "[(512,10,5)] + [(512,3,2)] * 4" (no eval)."""
    total: list[tuple[int, int, int]] = []
    for term in conv_feature_layers.replace(" ", "").split("+"):
        lst, _, times = term.partition("*")
        layers = [tuple(int(v) for v in t) for t in ast.literal_eval(lst)]
        total += layers * (int(times) if times else 1)
    return total


def receptive_field(layers) -> tuple[int, int]:
    """(window, hop) in samples of the conv stack: its receptive field and its total stride."""
    window, hop = 1, 1
    for _, k, s in layers:
        window += (k - 1) * hop
        hop *= s
    return window, hop


def num_frames(num_samples: int, layers) -> int:
    """Output frames of the conv stack (no padding) for an input of num_samples."""
    n = int(num_samples)
    for _, k, s in layers:
        n = (n - k) // s + 1
    return max(n, 0)


@functools.lru_cache(maxsize=8)
def _dct(n_mels: int, n_ceps: int) -> np.ndarray:
    """Orthonormal DCT-II (n_mels, n_ceps), as Kaldi / torchaudio."""
    n = np.arange(n_mels)[:, None]
    k = np.arange(n_ceps)[None, :]
    d = np.cos(np.pi / n_mels * (n + 0.5) * k) * np.sqrt(2.0 / n_mels)
    d[:, 0] = np.sqrt(1.0 / n_mels)
    return d


def deltas(x: np.ndarray, window: int = 2) -> np.ndarray:
    """Kaldi `compute-deltas` regression over +-window frames with edge replication; x: (T, D)."""
    if len(x) == 0:
        return x.copy()
    pad = np.concatenate([np.repeat(x[:1], window, 0), x, np.repeat(x[-1:], window, 0)])
    num = sum(n * (pad[window + n : window + n + len(x)] - pad[window - n : window - n + len(x)]) for n in range(1, window + 1))
    return num / (2.0 * sum(n * n for n in range(1, window + 1)))


def mfcc(
    wav: np.ndarray,
    window: int = 400,
    hop: int = 320,
    n_mels: int = 23,
    n_ceps: int = 13,
    n_deltas: int = 2,
    cmn: bool = True,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    preemph: float = 0.97,
    lifter: float = 22.0,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """MFCCs (+ n_deltas orders of deltas) of a mono waveform: (frames, n_ceps * (1 + n_deltas)), float32.

    frames = floor((len - window) / hop) + 1 (0 if the waveform is shorter than one window).
    cmn: subtract the utterance mean of each coefficient (cepstral mean normalisation).
    """
    wav = np.asarray(wav, dtype=np.float64).reshape(-1)
    n = 0 if len(wav) < window else (len(wav) - window) // hop + 1
    dim = n_ceps * (1 + n_deltas)
    if n == 0:
        return np.zeros((0, dim), np.float32)
    idx = np.arange(window)[None, :] + hop * np.arange(n)[:, None]
    frames = wav[idx]
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = np.concatenate([frames[:, :1] * (1 - preemph), frames[:, 1:] - preemph * frames[:, :-1]], axis=1)
    frames = frames * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window) / (window - 1))) ** 0.85  # Povey
    n_fft = 1 << (window - 1).bit_length()
    power = np.abs(np.fft.rfft(frames, n=n_fft, axis=1)) ** 2
    fbank = np.log(np.maximum(power @ kaldi_mel_banks(n_mels, n_fft, sample_rate, low_freq, high_freq).T, np.finfo(np.float32).eps))
    ceps = fbank @ _dct(n_mels, n_ceps)
    ceps = ceps * (1.0 + 0.5 * lifter * np.sin(np.pi * np.arange(n_ceps) / lifter))
    if cmn:
        ceps = ceps - ceps.mean(axis=0, keepdims=True)
    feats = [ceps]
    for _ in range(n_deltas):
        feats.append(deltas(feats[-1]))
    return np.concatenate(feats, axis=1).astype(np.float32)
