"""SUPERB keyword spotting (s3prl 0.4.18 `problem/common/superb_ks.py`, `downstream/speech_commands`): 12
classes (10 keywords, "_unknown_", "_silence_"), the pooled linear head of qspeech.tasks.utterance, Adam 1e-4,
batch 32, 200k steps, dev accuracy every 5k steps (conf/train/superb_ks.yaml); accuracy on the test set.
task=ks reads Speech Commands v1.0 under data.root; task=ks_small synthesizes its own keywords (ks corpus of
qspeech.data.synth_tasks). Departure: s3prl samples classes uniformly (WeightedRandomSampler) and crops
silence at random offsets; here batches are drawn from the split as it is and silence is fixed 1 s segments
(superb_ks's newer data preparation)."""

from __future__ import annotations

from dataclasses import dataclass

from qspeech.checks import choice
from qspeech.tasks.utterance import UtteranceConfig, classification_task

CLASSES = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_unknown_", "_silence_")


@dataclass
class KSConfig(UtteranceConfig):
    """The `task` config group for kind=ks; the defaults are conf/task/ks.yaml (SUPERB's recipe)."""

    name: str = "ks"
    kind: str = "ks"
    dataset: str = "speech_commands"

    def __post_init__(self):
        super().__post_init__()
        choice(self, "kind", ("ks",))
        choice(self, "dataset", ("speech_commands", "synth"))


TASK = classification_task("ks", KSConfig, CLASSES)
