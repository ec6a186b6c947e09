"""SUPERB speaker identification (s3prl 0.4.18 `problem/common/superb_sid.py`, `downstream/voxceleb1`): one class
per speaker, the pooled linear head of qspeech.tasks.utterance, Adam 1e-4, batch 8 x 4 accumulated (here batch
32), 200k steps, dev accuracy every 5k steps (conf/train/superb_sid.yaml); accuracy on the test split.
task=sid reads the VoxCeleb1 identification split under data.root; task=sid_small synthesizes the same eSpeak
voices into every split, with different sentences. Departure: s3prl crops training utterances to 8 s at random
offsets; here each utterance is pooled whole."""

from __future__ import annotations

from dataclasses import dataclass

from qspeech.checks import choice
from qspeech.tasks.utterance import UtteranceConfig, classification_task


@dataclass
class SIDConfig(UtteranceConfig):
    """The `task` config group for kind=sid; the defaults are conf/task/sid.yaml (SUPERB's recipe)."""

    name: str = "sid"
    kind: str = "sid"
    dataset: str = "voxceleb1"

    def __post_init__(self):
        super().__post_init__()
        choice(self, "kind", ("sid",))
        choice(self, "dataset", ("voxceleb1", "synth"))


TASK = classification_task("sid", SIDConfig)
