"""Minimal ctypes binding to the eSpeak NG library shipped by the `espeakng-loader` wheel.

Only synthesis to memory is used (AUDIO_OUTPUT_SYNCHRONOUS + a synth callback). eSpeak keeps global
state between utterances (glottal phase, flutter, noise generators), so its output depends on what the
process synthesized before: callers that need bit-identical audio synthesize a fixed sequence of
utterances in a fresh process (see qspeech.data.mini).
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from importlib.metadata import version

import numpy as np

from qspeech.errors import DataError

__all__ = ["ACCENTS", "Espeak", "english_accents", "voice_variants", "espeak_version"]

# English accents of espeak-ng's lang/gmw (en-Shaw is the Shavian alphabet: not an accent, left out).
ACCENTS = ["en", "en-029", "en-GB-scotland", "en-GB-x-gbclan", "en-GB-x-gbcwmd", "en-GB-x-rp", "en-US", "en-US-nyc"]
# Variants that are not read speech (whispering has almost no voicing).
_EXCLUDED_VARIANTS = {"whisper", "whisperf"}

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_espeakCHARS_UTF8 = 1
_espeakRATE, _espeakVOLUME, _espeakPITCH, _espeakRANGE, _espeakWORDGAP = 1, 2, 3, 4, 7
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def _data_path() -> str:
    try:
        import espeakng_loader  # loads eSpeak NG's data only when synthesizing
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError("the mini corpus needs eSpeak NG: pip install espeakng-loader") from None
    return espeakng_loader.get_data_path()


def espeak_version() -> str:
    try:
        return version("espeakng-loader")
    except Exception:  # pragma: no cover
        return "unknown"


@lru_cache(maxsize=1)
def english_accents() -> tuple[str, ...]:
    base = os.path.join(_data_path(), "lang", "gmw")
    return tuple(a for a in ACCENTS if os.path.isfile(os.path.join(base, a)))


@lru_cache(maxsize=1)
def voice_variants() -> tuple[str, ...]:
    vdir = os.path.join(_data_path(), "voices", "!v")
    names = sorted(n for n in os.listdir(vdir) if os.path.isfile(os.path.join(vdir, n)) and " " not in n)
    return tuple(n for n in names if n not in _EXCLUDED_VARIANTS)


class Espeak:
    """One eSpeak NG engine per process: ``Espeak().synth(text, voice, rate, pitch)`` -> int16 at 22.05 kHz."""

    _instance: "Espeak | None" = None

    def __new__(cls):
        if cls._instance is None:
            obj = super().__new__(cls)
            obj._init()
            cls._instance = obj
        return cls._instance

    def _init(self) -> None:
        import espeakng_loader  # loads eSpeak NG's library only when synthesizing

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        sr = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, _data_path().encode(), 0)
        if sr <= 0:
            raise DataError(f"eSpeak NG failed to initialise (data at {_data_path()})")
        self.sample_rate = int(sr)
        self._set_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self._set_seed is not None:
            self._set_seed.argtypes = [ctypes.c_long]
            self._set_seed.restype = None
        try:
            self._srand = ctypes.CDLL(None).srand
            self._srand.argtypes = [ctypes.c_uint]
            self._srand.restype = None
        except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
            self._srand = None
        self._lib = lib
        self._chunks: list[np.ndarray] = []

        def _cb(wav, n, _events):
            if n > 0 and wav:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._cb = _CALLBACK(_cb)  # keep a reference: the library holds the pointer
        lib.espeak_SetSynthCallback(self._cb)

    def synth(self, text: str, voice: str, rate: int = 175, pitch: int = 50, pitch_range: int = 50,
              seed: int = 0) -> np.ndarray:
        lib = self._lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise DataError(f"eSpeak NG has no voice {voice!r}")
        lib.espeak_SetParameter(_espeakRATE, int(rate), 0)
        lib.espeak_SetParameter(_espeakPITCH, int(pitch), 0)
        lib.espeak_SetParameter(_espeakRANGE, int(pitch_range), 0)
        # eSpeak NG draws from its own PRNG (and some builds from libc rand()): seed both per utterance
        if self._set_seed is not None:
            self._set_seed(int(seed) & 0x7FFFFFFF)
        if self._srand is not None:
            self._srand(int(seed) & 0xFFFFFFFF)
        self._chunks = []
        data = text.encode("utf-8")
        err = lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _espeakCHARS_UTF8, None, None)
        if err != 0:
            raise DataError(f"eSpeak NG synthesis failed (error {err}) for voice {voice!r}")
        lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)
