"""Transcript normalisation to the SUPERB/LibriSpeech character set.

The output alphabet is upper-case ``A``-``Z``, the apostrophe and single spaces. Digits are spelled out
(cardinals, ordinals like ``3rd``, decimals, ``%``, ``$``), ``&`` becomes ``AND``, accents are stripped,
hyphens and other punctuation separate or disappear, and apostrophes survive only inside words
(``DON'T``; quotes like ``'hello'`` lose theirs).
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["normalize_text", "number_to_words"]

_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = [(10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand")]
_ORDINAL_IRREGULAR = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
    "nine": "ninth", "twelve": "twelfth",
}


def _below_1000(n: int) -> list[str]:
    words: list[str] = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10])
        if n % 10:
            words.append(_ONES[n % 10])
    elif n > 0:
        words.append(_ONES[n])
    return words


def number_to_words(n: int, ordinal: bool = False) -> str:
    """Spell a non-negative integer in English words: 1203 -> 'one thousand two hundred three'."""
    if n < 0:
        return "minus " + number_to_words(-n, ordinal)
    if n >= 10**15:  # absurdly long: read digit by digit
        return " ".join(_ONES[int(d)] for d in str(n))
    words: list[str] = []
    if n == 0:
        words = ["zero"]
    for scale, name in _SCALES:
        if n >= scale:
            words += _below_1000(n // scale) + [name]
            n %= scale
    words += _below_1000(n)
    if ordinal:
        last = words[-1]
        if last in _ORDINAL_IRREGULAR:
            last = _ORDINAL_IRREGULAR[last]
        elif last.endswith("y"):
            last = last[:-1] + "ieth"
        else:
            last += "th"
        words[-1] = last
    return " ".join(words)


_NUM_RE = re.compile(
    r"(?P<cur>\$)?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<dec>\d+))?"
    r"(?P<suf>st|nd|rd|th|s|%)?(?![A-Za-z0-9])",
    re.IGNORECASE,
)


def _plural(word: str) -> str:
    if word.endswith("y"):
        return word[:-1] + "ies"
    if word.endswith(("x", "s")):
        return word + "es"
    return word + "s"


def _spell_number(m: re.Match) -> str:
    n = int(m.group("int").replace(",", ""))
    dec, suf, cur = m.group("dec"), (m.group("suf") or "").lower(), m.group("cur")
    if suf in ("st", "nd", "rd", "th") and dec is None:
        words = number_to_words(n, ordinal=True)
    elif cur and dec is not None and len(dec) == 2:  # $3.50 -> three dollars fifty cents
        cents = int(dec)
        words = number_to_words(n) + (" dollar" if n == 1 else " dollars")
        if cents:
            words += " " + number_to_words(cents) + (" cent" if cents == 1 else " cents")
        return f" {words} "
    else:
        words = number_to_words(n)
        if dec is not None:
            words += " point " + " ".join(_ONES[int(d)] for d in dec)
        if suf == "s":
            head, _, last = words.rpartition(" ")
            words = (head + " " if head else "") + _plural(last)
        elif suf == "%":
            words += " percent"
    if cur:
        words += " dollar" if (n == 1 and dec is None) else " dollars"
    return f" {words} "


_APOSTROPHES = str.maketrans({c: "'" for c in "\u2018\u2019\u02bc\u00b4`\u2032"})
_NOT_ALLOWED = re.compile(r"[^A-Z' ]+")
_STRAY_APOS = re.compile(r"(?<![A-Z])'|'(?![A-Z])")


def normalize_text(text: str) -> str:
    """Map a transcript to SUPERB's character set: 'Don't stop, 2nd-rate!' -> "DON'T STOP SECOND RATE"."""
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", str(text)).translate(_APOSTROPHES)
    text = text.replace("&", " and ").replace("%", " percent ")
    # "1,000.5" / "3rd" / "$20" / "1990s": numbers glued to letters on the left (e.g. "mp3") are read as digits.
    text = _NUM_RE.sub(_spell_number, text)
    text = re.sub(r"\d", lambda m: f" {_ONES[int(m.group())]} ", text)
    # strip accents: é -> e, ß stays out (no ASCII decomposition) and is dropped below
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = text.upper()
    text = _NOT_ALLOWED.sub(" ", text)
    text = _STRAY_APOS.sub(" ", text)
    return " ".join(text.split())
