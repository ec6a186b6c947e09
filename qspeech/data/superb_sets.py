"""The real data sets of SUPERB KS, SID and IC, read from their own on-disk layouts under `data.root`:

* Speech Commands v1.0 (KS, s3prl `downstream/speech_commands` + `problem/common/superb_ks.py`):
  ``<root>/speech_commands_v0.01/<word>/*.wav`` with ``validation_list.txt`` and ``testing_list.txt`` and
  ``_background_noise_/*.wav``, plus the separate test set ``<root>/speech_commands_test_set_v0.01/<class>/*.wav``.
  train = files in neither list, dev = validation_list (testing_list is discarded, the test set folder is
  the test split); words outside the 10 keywords are "_unknown_"; "_silence_" = the background-noise files
  cut into 1 s segments (superb_ks's gsc1_for_classification).
* VoxCeleb1 identification (SID, `downstream/voxceleb1`): ``<root>/iden_split.txt`` ("1|2|3 id10001/<yt>/<n>.wav":
  train, dev, test) and the audio under ``<root>/wav/`` (or ``<root>/dev/wav`` + ``<root>/test/wav``); the
  label is the speaker id.
* Fluent Speech Commands (IC, `downstream/fluent_commands`): ``<root>/data/{train,valid,test}_data.csv``
  (path, speakerId, transcription, action, object, location), audio at ``<root>/<path>``; the label is
  "action;object;location".

Every missing piece is a DataError naming the file or folder expected.
"""

from __future__ import annotations

import csv
from pathlib import Path

from qspeech.data.audio import audio_info
from qspeech.data.config import resolve_path
from qspeech.data.labeled import LabeledUtterance
from qspeech.errors import DataError

__all__ = ["REAL_SETS", "load_real_split"]

SAMPLE_RATE = 16_000
_SC_TRAIN, _SC_TEST = "speech_commands_v0.01", "speech_commands_test_set_v0.01"
KS_KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


def _need(path: Path, what: str, root: Path, dataset: str) -> Path:
    if not path.exists():
        raise DataError(f"{dataset}: {what} not found: expected {path} (data.root={root})")
    return path


def _utt(utt_id: str, path: Path, label: str, speaker: str) -> LabeledUtterance | None:
    try:
        frames, sr = audio_info(path)
    except DataError:
        return None  # unreadable: skipped (counted by the caller)
    return LabeledUtterance(utt_id, str(path), label, speaker, round(frames / sr, 4))


def _speech_commands(root: Path, split: str) -> list[LabeledUtterance]:
    name = "Speech Commands v1.0"
    if split == "test":
        test = _need(root / _SC_TEST, "the test set folder", root, name)
        files = sorted(test.glob("*/*.wav"))
        if not files:
            raise DataError(f"{name}: no <class>/*.wav files under {test}")
        return [u for f in files if (u := _utt(f"{f.parent.name}/{f.name}", f, f.parent.name, f.stem.split("_")[0]))]
    base = _need(root / _SC_TRAIN, "the train folder", root, name)
    lists = {k: set(_need(base / f"{k}_list.txt", f"{k}_list.txt", root, name).read_text().split())
             for k in ("validation", "testing")}
    out = []
    for f in sorted(base.glob("*/*.wav")):
        word = f.parent.name
        if word == "_background_noise_":
            continue
        rel = f"{word}/{f.name}"
        if (rel in lists["validation"]) != (split == "dev") or rel in lists["testing"]:
            continue
        u = _utt(rel, f, word if word in KS_KEYWORDS else "_unknown_", f.stem.split("_")[0])
        if u:
            out.append(u)
    noise = sorted(_need(base / "_background_noise_", "_background_noise_/", root, name).glob("*.wav"))
    for f in noise:  # 1 s segments; every 10th one goes to dev
        frames, sr = audio_info(f)
        n = int(frames * SAMPLE_RATE / sr)
        for k, start in enumerate(range(0, n - SAMPLE_RATE + 1, SAMPLE_RATE)):
            if (k % 10 == 0) == (split == "dev"):
                out.append(LabeledUtterance(f"_silence_/{f.stem}-{k:04d}", f"{f}#{start}:{start + SAMPLE_RATE}",
                                            "_silence_", "noise", 1.0))
    return out


def _voxceleb1(root: Path, split: str) -> list[LabeledUtterance]:
    name = "VoxCeleb1"
    meta = _need(root / "iden_split.txt", "iden_split.txt", root, name)
    want = {"train": "1", "dev": "2", "test": "3"}[split]
    bases = [root / "wav", root / "dev" / "wav", root / "test" / "wav"]
    if not any(b.is_dir() for b in bases):
        raise DataError(f"{name}: no audio folder: expected {bases[0]} (or dev/wav and test/wav) (data.root={root})")
    out, missing = [], []
    for line in meta.read_text().splitlines():
        parts = line.split()
        if len(parts) != 2 or parts[0] != want:
            continue
        path = next((b / parts[1] for b in bases if (b / parts[1]).is_file()), None)
        if path is None:
            missing.append(parts[1])
            continue
        u = _utt(parts[1], path, parts[1].split("/")[0], parts[1].split("/")[0])
        if u:
            out.append(u)
    if missing and not out:
        raise DataError(f"{name}: none of the {split} files of iden_split.txt exist, e.g. {bases[0] / missing[0]}")
    return out


def _fluent(root: Path, split: str) -> list[LabeledUtterance]:
    name = "Fluent Speech Commands"
    table = _need(root / "data" / f"{ {'train': 'train', 'dev': 'valid', 'test': 'test'}[split]}_data.csv",
                  f"the {split} csv", root, name)
    out = []
    with open(table, newline="") as f:
        rows = csv.DictReader(f)
        cols = {"path", "speakerId", "action", "object", "location"}
        if not cols <= set(rows.fieldnames or []):
            raise DataError(f"{name}: {table} lacks column(s) {', '.join(sorted(cols - set(rows.fieldnames or [])))}")
        for row in rows:
            u = _utt(row["path"], root / row["path"], f"{row['action']};{row['object']};{row['location']}",
                     row["speakerId"])
            if u:
                out.append(u)
    return out


REAL_SETS = {"speech_commands": _speech_commands, "voxceleb1": _voxceleb1, "fluent_speech_commands": _fluent}


def load_real_split(dataset: str, root, split: str) -> list[LabeledUtterance]:
    """`split` (train | dev | test) of a real data set under `root` (data.root), in its own layout."""
    if root in (None, ""):
        raise DataError(f"data.root is not set: set data.root=/path/to/the {dataset} data set")

    root = resolve_path(root)
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a folder: set data.root=/path/to/the {dataset} data set")
    utts = REAL_SETS[dataset](root, split)
    if not utts:
        raise DataError(f"no readable utterances in the {split} split of {dataset} under {root}")
    return utts
