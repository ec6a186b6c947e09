"""Phone labels for phoneme recognition (task=pr / pr_small): the 39 CMU phones of SUPERB PR, from eSpeak NG
for synthesized speech ("the synthesizer knows what it said") or from a pronunciation lexicon for real text.

eSpeak NG's `espeak_TextToPhonemes` gives its own phoneme mnemonics for a text in a voice's accent (the same
rules it speaks with). ESPEAK_TO_CMU maps each mnemonic to CMU phones the way the CMU dictionary (and so
s3prl's LibriSpeech lexicon) writes English, i.e. lexicon-style, not narrowly phonetic:

* stress marks (' ,), pause/length/boundary marks (_ : ; |) are dropped; CMU's stress digits are dropped too;
* r-coloured vowels become vowel + R (A@ "are" -> AA R, e@ "there" -> EH R, O@/o@ -> AO R, i@/i@3 -> IH R,
  U@ -> UH R), the nurse vowels 3: / 3 / VR / IR -> ER, aI@ "fire" -> AY ER;
* reduced vowels @ / @2 / a# / @- -> AH, syllabic @L -> AH L, n- -> N, l- -> L, r- -> R;
* accent variants of one CMU vowel share it: 0 (lot), A and A: -> AA, O: / O2 -> AO, oU / @U -> OW,
  aa (bath) -> AE, i (happY) -> IY, u (reduced "to") -> UW, I2 / I# -> IH, aI2 / aI3 -> AY;
* consonant allophones: t# (flap), t[ (dental), t2, ? (glottal stop) -> T; w# ("what" in Scottish) -> W;
  x (loch) -> K.

An accent's vowel system (en-GB-x-rp's non-rhotic "are") is thus written as the CMU dictionary writes the
word, as SUPERB's lexicon-based labels are. A mnemonic outside the table is an error naming it.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

from qspeech.data.espeak import Espeak
from qspeech.errors import DataError

__all__ = ["CMU_PHONES", "ESPEAK_TO_CMU", "espeak_phonemes", "phonemize", "strip_stress"]

# The 39 phones of the CMU dictionary without stress (SUPERB PR's phone set).
CMU_PHONES = ("AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH", "IH", "IY",
              "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH", "UW", "V", "W", "Y",
              "Z", "ZH")

ESPEAK_TO_CMU: dict[str, tuple[str, ...]] = {
    # vowels
    "a": ("AE",), "aa": ("AE",), "a#": ("AH",), "a2": ("AH",), "A:": ("AA",), "A": ("AA",), "A@": ("AA", "R"), "0": ("AA",),
    "aI": ("AY",), "aI2": ("AY",), "aI3": ("AY", "ER"), "aI@": ("AY", "ER"), "aU": ("AW",), "aU@": ("AW", "ER"),
    "@": ("AH",), "@2": ("AH",), "@5": ("AH",), "@-": ("AH",), "@L": ("AH", "L"), "@U": ("OW",), "V": ("AH",),
    "3": ("ER",), "3:": ("ER",), "VR": ("ER",), "IR": ("ER",), "@r": ("ER",),
    "e": ("EH",), "E": ("EH",), "E2": ("EH",), "E:": ("EH",), "e@": ("EH", "R"), "eI": ("EY",),
    "i": ("IY",), "i:": ("IY",), "I": ("IH",), "I2": ("IH",), "I#": ("IH",), "i@": ("IH", "R"), "i@3": ("IH", "R"),
    "O:": ("AO",), "O2": ("AO",), "O": ("AO",), "O@": ("AO", "R"), "o@": ("AO", "R"), "OI": ("OY",),
    "oU": ("OW",), "o": ("OW",), "u:": ("UW",), "u": ("UW",), "U": ("UH",), "U@": ("UH", "R"),
    # consonants
    "p": ("P",), "b": ("B",), "t": ("T",), "t#": ("T",), "t[": ("T",), "t2": ("T",), "?": ("T",), "d": ("D",),
    "k": ("K",), "x": ("K",), "g": ("G",), "f": ("F",), "v": ("V",), "T": ("TH",), "D": ("DH",), "s": ("S",),
    "z": ("Z",), "S": ("SH",), "Z": ("ZH",), "h": ("HH",), "tS": ("CH",), "dZ": ("JH",), "m": ("M",), "n": ("N",),
    "n-": ("N",), "N": ("NG",), "l": ("L",), "l-": ("L",), "r": ("R",), "r-": ("R",), "w": ("W",), "w#": ("W",),
    "j": ("Y",),
}
_DROP = set("',%=_:;!|")  # stress, syllabicity, pause and length marks


def strip_stress(phone: str) -> str:
    """A lexicon's phone without CMU stress digits: AH0 -> AH."""
    return phone.rstrip("012")


@lru_cache(maxsize=1)
def _text_to_phonemes():
    import espeakng_loader  # loads eSpeak NG's library only when phonemizing


    Espeak()  # initialises the library (the same process-wide handle as synthesis)
    fn = ctypes.CDLL(espeakng_loader.get_library_path()).espeak_TextToPhonemes
    fn.restype = ctypes.c_char_p
    fn.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
    return fn


def espeak_phonemes(text: str, voice: str) -> list[str]:
    """eSpeak NG's phoneme mnemonics for `text` spoken by `voice` (e.g. "en-us+m3"), stress marks removed."""

    if Espeak()._lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise DataError(f"eSpeak NG has no voice {voice!r}")
    fn = _text_to_phonemes()
    buf = ctypes.c_char_p(text.encode("utf-8"))
    ptr = ctypes.pointer(buf)
    out: list[str] = []
    # one clause per call; the library advances the pointer (NULL at the end)
    while ptr.contents.value:
        got = fn(ptr, 1, ord(" ") << 8)  # UTF-8 text; phonemes separated by spaces
        if got is None:
            break
        for tok in got.decode("utf-8", errors="replace").split():
            tok = "".join(c for c in tok if c not in _DROP) if tok not in ESPEAK_TO_CMU else tok
            if tok:
                out.append(tok)
    return out


def phonemize(text: str, voice: str) -> list[str]:
    """CMU phones (CMU_PHONES) of `text` as eSpeak NG speaks it in `voice`; DataError on an unmapped mnemonic."""
    phones: list[str] = []
    for tok in espeak_phonemes(text, voice):
        mapped = ESPEAK_TO_CMU.get(tok)
        if mapped is None:
            raise DataError(f"eSpeak NG phoneme {tok!r} (in {text!r}, voice {voice}) has no CMU phone: "
                            "add it to qspeech/data/phonemes.py ESPEAK_TO_CMU")
        phones += mapped
    return phones
