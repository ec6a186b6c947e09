"""Character vocabulary for CTC ASR.

Index layout (29 symbols), fixed so that heads trained in different runs are comparable:

    0        <blank>  CTC blank (s3prl's recipe also puts the blank at 0)
    1        |        word boundary (a space in the text, fairseq/s3prl letter-dictionary style)
    2 .. 27  A .. Z
    28       '        apostrophe

Texts are expected normalised (A-Z, apostrophe, single spaces; see qspeech.data.normalize_text).
Characters outside the vocabulary are dropped when encoding.
"""

from __future__ import annotations

import string

BLANK = 0
WORD_BOUNDARY = "|"


class CharVocab:
    def __init__(self):
        self.symbols = ["<blank>", WORD_BOUNDARY, *string.ascii_uppercase, "'"]
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.blank = BLANK

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        text = " ".join(text.upper().split())
        return [self.index[WORD_BOUNDARY if c == " " else c] for c in text if c == " " or c in self.index]

    def decode(self, ids) -> str:
        chars = [self.symbols[i] for i in ids if i != self.blank]
        return " ".join("".join(chars).replace(WORD_BOUNDARY, " ").split())
