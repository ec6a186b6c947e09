"""Character vocabularies for CTC ASR: qspeech's 29 symbols (CharVocab) and s3prl's SUPERB ASR dictionary
(S3PRLCharVocab, task.vocab=s3prl). make_vocab(name) picks one.

CharVocab's index layout (29 symbols), fixed so that heads trained in different runs are comparable:

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


# s3prl 0.4.18 s3prl/downstream/asr/char.dict: the letters of LibriSpeech by descending count (counts left out).
S3PRL_CHARS = ("|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U", "M", "C", "W", "F", "G", "Y", "P",
               "B", "V", "K", "'", "X", "J", "Q", "Z")
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq Dictionary(): bos, pad, eos, unk at 0..3


class S3PRLCharVocab:
    """s3prl's SUPERB ASR dictionary (downstream/asr/expert.py: Dictionary.load(char.dict)): fairseq's four
    specials then char.dict's 28 characters, 32 symbols. The CTC blank is <s> (dictionary.bos(), 0).

    encode: as s3prl's dataset encodes a transcript (downstream/asr/dataset.py): upper case, '|' for each space,
    a final '|', then fairseq's encode_line appends </s>; so the CTC targets end with '|' and </s>. Characters
    outside the dictionary are dropped (s3prl would add them to its dictionary). decode: as expert.py's _decode,
    Dictionary.string then token_to_word: <s> and </s> dropped, <pad> and <unk> kept as text, '|' -> space.
    """

    def __init__(self):
        self.symbols = [*FAIRSEQ_SPECIALS, *S3PRL_CHARS]
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.blank = self.index["<s>"]
        self.eos = self.index["</s>"]

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        chars = [WORD_BOUNDARY if c == " " else c for c in " ".join(text.upper().split())] + [WORD_BOUNDARY]
        return [self.index[c] for c in chars if c in S3PRL_CHARS] + [self.eos]

    def decode(self, ids) -> str:
        chars = [self.symbols[i] for i in ids if i not in (self.blank, self.eos)]
        return " ".join("".join(chars).replace(WORD_BOUNDARY, " ").split())


VOCABS = {"qspeech": CharVocab, "s3prl": S3PRLCharVocab}


def make_vocab(name: str):
    return VOCABS[name]()
