"""Labelled utterances for the classification tasks (ks, sid, ic): one label per utterance, not a transcript.

A label is a string; intent classification joins its slots with ';' ("activate;lights;kitchen"), as s3prl's
superb_ic does. `path` may name a segment of a longer file as "<file>#<start>:<end>" (samples at 16 kHz): Speech
Commands' silence class is cut from its background-noise recordings this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from qspeech.data.audio import read_audio
from qspeech.errors import DataError

__all__ = ["LabeledUtterance", "check_classes", "read_segment"]


@dataclass(frozen=True)
class LabeledUtterance:
    utt_id: str
    path: str  # audio file, or "<file>#<start>:<end>" (a segment, in 16 kHz samples)
    label: str
    speaker: str
    duration_s: float


def read_segment(path: str) -> np.ndarray:
    """qspeech.data.read_audio, plus "<file>#<start>:<end>" segments (16 kHz samples)."""

    file, sep, span = str(path).rpartition("#")
    if not sep or ":" not in span:
        return read_audio(path)
    start, end = (int(x) for x in span.split(":"))
    wav = read_audio(file)[start:end]
    if wav.size == 0:
        raise DataError(f"audio segment {path} is empty (the file has fewer samples)")
    return wav


def check_classes(splits: dict[str, Sequence[LabeledUtterance]], classes: Sequence[str] | None = None,
                  slot_sep: str | None = None) -> list[str]:
    """The classes (sorted; `classes` when given), checked: every split has utterances, every class of dev/test
    occurs in train, every class occurs in train. With `slot_sep`, labels are checked slot by slot.
    DataError naming the class and the split otherwise."""
    for split, utts in splits.items():
        if not utts:
            raise DataError(f"the {split} split has no utterances")

    def parts(label: str) -> list[str]:
        return [f"{i}:{p}" for i, p in enumerate(label.split(slot_sep))] if slot_sep else [label]

    seen = {s: {p for u in utts for p in parts(u.label)} for s, utts in splits.items()}
    known = set(classes) if classes is not None else seen.get("train", set())
    if classes is not None:
        for s, got in seen.items():
            extra = sorted(got - known)
            if extra:
                raise DataError(f"the {s} split has label {extra[0]!r}, which is not one of the task's classes")
    for s in splits:
        if s == "train":
            continue
        absent = sorted(seen[s] - seen.get("train", set()))
        if absent:
            raise DataError(f"class {absent[0]!r} of the {s} split is absent from the train split: "
                            "the head cannot learn it; fix the data split")
    if classes is not None:
        absent = sorted(known - seen.get("train", set()))
        if absent:
            raise DataError(f"class {absent[0]!r} is absent from the train split; fix the data split")
    return sorted(known)
