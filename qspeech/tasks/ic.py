"""SUPERB intent classification (s3prl 0.4.18 `problem/common/superb_ic.py`, `downstream/fluent_commands`): three
slots (action, object, location), one linear output block per slot over the pooled head of
qspeech.tasks.utterance, the sum of the slots' cross-entropies, Adam 1e-4, batch 32, 200k steps, dev accuracy
every 5k steps (conf/train/superb_ic.yaml); accuracy = all three slots right. task=ic reads Fluent Speech
Commands under data.root; task=ic_small synthesizes FSC-style commands (31 intents, several phrasings)."""

from __future__ import annotations

from dataclasses import dataclass

from qspeech.checks import choice
from qspeech.tasks.utterance import UtteranceConfig, classification_task


@dataclass
class ICConfig(UtteranceConfig):
    """The `task` config group for kind=ic; the defaults are conf/task/ic.yaml (SUPERB's recipe)."""

    name: str = "ic"
    kind: str = "ic"
    dataset: str = "fluent_speech_commands"

    def __post_init__(self):
        super().__post_init__()
        choice(self, "kind", ("ic",))
        choice(self, "dataset", ("fluent_speech_commands", "synth"))


# slot values: those of the train split (s3prl builds its encoder from the csv files), checked per split
TASK = classification_task("ic", ICConfig, slots=3)
