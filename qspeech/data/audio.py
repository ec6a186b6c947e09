"""Audio reading: any libsndfile format -> float32 mono at 16 kHz."""

from __future__ import annotations

import os

import numpy as np

from qspeech.errors import DataError

__all__ = ["SAMPLE_RATE", "read_audio", "resample", "audio_info"]

SAMPLE_RATE = 16000


def resample(wav: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono float32 signal with soxr (high quality); no-op when the rates match."""
    wav = np.asarray(wav, dtype=np.float32)
    if int(sr_in) == int(sr_out):
        return wav
    import soxr  # heavy: only when resampling

    return np.asarray(soxr.resample(wav, int(sr_in), int(sr_out), quality="HQ"), dtype=np.float32)


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"audio file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"audio path is a folder, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise DataError(f"audio file is empty (0 bytes): {path}")


def audio_info(path) -> tuple[int, int]:
    """(n_frames, sample_rate) from the file header; DataError if unreadable or empty."""
    import soundfile as sf  # libsndfile, loaded on first read

    path = os.fspath(path)
    _check_exists(path)
    try:
        info = sf.info(path)
    except Exception as e:  # libsndfile raises LibsndfileError/RuntimeError/TypeError depending on version
        raise DataError(f"cannot read audio file {path}: {_reason(e, path)}") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise DataError(f"audio file has no samples: {path}")
    return int(info.frames), int(info.samplerate)


def _reason(e: Exception, path: str = "") -> str:
    msg = str(e)
    if path:  # libsndfile: "Error opening '<path>': Format not recognised."
        msg = msg.replace(f"Error opening {path!r}: ", "").replace(path, "<file>")
    return " ".join(msg.split()) or type(e).__name__


def read_audio(path) -> np.ndarray:
    """Read an audio file as float32 mono at 16 kHz (channels averaged, resampled with soxr).

    Raises DataError with one line naming the file when it is missing, unreadable or empty.
    """
    import soundfile as sf  # libsndfile, loaded on first read

    path = os.fspath(path)
    _check_exists(path)
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise DataError(f"cannot read audio file {path}: {_reason(e, path)}") from None
    if wav.size == 0:
        raise DataError(f"audio file has no samples: {path}")
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    if not np.all(np.isfinite(wav)):
        raise DataError(f"audio file contains NaN/inf samples: {path}")
    return np.ascontiguousarray(resample(wav, sr, SAMPLE_RATE), dtype=np.float32)
