"""Utterance-level classification on a frozen upstream (SUPERB KS, SID, IC): s3prl 0.4.18's head for all three
(`s3prl/nn/linear.py` MeanPoolingLinear = `s3prl/nn/common.py` UtteranceLevel with hidden_sizes=[256]):
weighted sum of all hidden states -> Linear(D, 256) -> mean over valid frames -> Linear(256, classes), no
non-linearity; cross-entropy (IC: one per slot, summed), accuracy.

Everything before the last Linear is linear in the hidden states, so mean pooling commutes with the weighted
sum and the first Linear: the head on each hidden state's mean over frames computes exactly the recipe's
head on the frames (tests/test_tasks_superb.py::test_pooled_head_equals_the_recipe_head_on_frames checks it).
Each utterance is therefore pooled once, from the feature cache (or the live upstream when the cache is off:
qspeech.features.pooled_splits), and training touches L x D numbers per utterance.

A task module (ks.py, sid.py, ic.py) gives its config (a UtteranceConfig) and classes: its
TASK = classification_task(kind, config, classes, slots).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qspeech.checks import choice, integer, number
from qspeech.data.labeled import check_classes, read_segment
from qspeech.data.superb_sets import load_real_split
from qspeech.data.synth_tasks import SynthConfig, load_synth_split
from qspeech.errors import ConfigError, DataError
from qspeech.features import Pooled, pool_hidden_states, pooled_splits
from qspeech.tasks.config import Task, TaskConfig
from qspeech.tasks.downstream import SPLITS, Splits
from qspeech.tasks.featurizer import Featurizer
from qspeech.tasks.metrics import Metric

__all__ = ["UtteranceConfig", "PooledHead", "pool_hidden_states", "classification_task"]

ACCURACY = Metric("acc", higher_is_better=True)  # percent of utterances with every slot right


@dataclass
class UtteranceConfig(TaskConfig):
    """What the classification tasks share; each kind's class sets its defaults (its faithful recipe)."""

    # synth: the corpus this project synthesizes (`corpus`); otherwise the real data set under data.root.
    dataset: str = "synth"
    featurizer_normalize: bool = False  # s3prl's Featurizer option (off in the SUPERB recipes)
    hidden_size: int = 256  # the first Linear (s3prl: hidden_sizes=[256])
    lr: float = 1.0e-4  # Adam
    # null: weighted sum of all hidden states; k: hidden state k alone (diagnosis, as task.layer of asr)
    layer: int | None = None
    corpus: SynthConfig = field(default_factory=SynthConfig)

    def __post_init__(self):
        super().__post_init__()
        integer(self, "hidden_size", 1)
        number(self, "lr", 0, lo_open=True)
        integer(self, "layer", 0, optional=True)
        choice(self, "featurizer_normalize", (False,))  # layer norm per frame would not commute with pooling


# ---------------------------------------------------------------------------------------------- model
class PooledHead(nn.Module):
    """Featurizer -> Linear(D, hidden) -> Linear(hidden, sum of slot sizes), on mean-pooled hidden states."""

    def __init__(self, num_hidden: int, hidden_dim: int, slots: Sequence[int], cfg: UtteranceConfig):
        super().__init__()
        if cfg.layer is not None and cfg.layer >= num_hidden:
            raise ConfigError(f"task.layer={cfg.layer}: the upstream has hidden states 0..{num_hidden - 1}")
        self.layer, self.slots = cfg.layer, list(slots)
        self.featurizer = Featurizer(num_hidden)
        self.proj = nn.Linear(hidden_dim, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, sum(self.slots))

    def forward(self, pooled: torch.Tensor) -> list[torch.Tensor]:
        """pooled: (B, L, D), each hidden state's mean over valid frames -> logits per slot, each (B, n)."""
        x = self.featurizer(pooled[:, None])[:, 0] if self.layer is None else pooled[:, self.layer]
        return list(self.out(self.proj(x)).split(self.slots, dim=-1))

    def frames_forward(self, hs: torch.Tensor, lens: torch.Tensor) -> list[torch.Tensor]:
        """The recipe's order (project every frame, then mean over valid frames): hs (B, F, L, D)."""
        x = self.featurizer(hs) if self.layer is None else hs[:, :, self.layer]
        x = self.proj(x)
        mask = (torch.arange(x.shape[1])[None, :] < lens[:, None]).to(x.dtype).unsqueeze(-1)
        return list(self.out((x * mask).sum(1) / lens[:, None].to(x.dtype)).split(self.slots, dim=-1))


# ---------------------------------------------------------------------------------------------- task
class ClassificationTask:
    """The trainable (qspeech.train.fit, run_downstream's Head) over pooled features: pooled[split].feats[j]
    is utts[split][j]'s, labels[split][j] its class per slot. Selects on dev error (100 - accuracy): fit keeps
    the lowest."""

    select_metric = "err"
    test_autocast = False  # the test split is scored in full precision (dev under train.amp, in fit)

    def __init__(self, model: PooledHead, pooled: dict[str, Pooled], labels: dict, utts: dict,
                 classes: list[list[str]], lr: float):
        self.model, self.pooled, self.labels, self.utts = model, pooled, labels, utts
        self.classes, self.lr = classes, lr
        self.feats = {s: p.feats for s, p in pooled.items()}
        self.last_predictions: dict[str, torch.Tensor] = {}

    def train_lengths(self):
        return [u.duration_s for u in self.utts["train"]]

    def make_optimizer(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)

    def make_batch(self, indices, device, split="train"):
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {"x": self.feats[split][idx].to(device), "y": self.labels[split][idx].to(device), "n": len(idx)}

    def loss(self, batch):
        logits = self.model(batch["x"])
        loss = sum(F.cross_entropy(lg.float(), batch["y"][:, k]) for k, lg in enumerate(logits))
        return loss, batch["n"]

    def evaluate(self, split, device):
        preds = []
        for b in range(0, len(self.labels[split]), 1024):
            logits = self.model(self.feats[split][b:b + 1024].to(device))
            preds.append(torch.stack([lg.argmax(-1) for lg in logits], dim=1).cpu())
        pred = torch.cat(preds)
        self.last_predictions[split] = pred
        acc = round(100.0 * int((pred == self.labels[split]).all(dim=1).sum()) / len(pred), 4)
        return {"acc": acc, "err": 100.0 - acc}

    def predictions_tsv(self, split: str) -> str:
        return "utt_id\tlabel\tpredicted\n" + "".join(
            f"{u.utt_id}\t{u.label}\t{';'.join(self.classes[k][int(p)] for k, p in enumerate(pred))}\n"
            for u, pred in zip(self.utts[split], self.last_predictions[split]))

    def saved(self) -> dict:
        return {"classes": self.classes}

    def feature_stats(self) -> dict:
        return {s: p.stats for s, p in self.pooled.items()}

    def extra_metrics(self) -> dict:
        return {"n_classes": [len(v) for v in self.classes],
                "majority_acc": round(_majority(self.labels["train"], self.labels["test"]), 2)}


def _majority(train: torch.Tensor, test: torch.Tensor) -> float:
    """Test accuracy (percent) of always answering the train split's most frequent label: the chance line."""
    values, counts = torch.unique(train, dim=0, return_counts=True)
    return 100.0 * float((test == values[counts.argmax()]).all(dim=1).float().mean())


def load_labeled_splits(cfg, progress: bool = True) -> tuple[dict, dict]:
    """({train, dev, test}: LabeledUtterance lists, {split: fingerprint of its content}) of cfg.task's data set:
    the synthesized corpus (task.dataset=synth) or the real one under data.root."""
    tcfg = cfg.task
    splits = {}
    for s in SPLITS:
        if tcfg.dataset == "synth":
            splits[s] = load_synth_split(tcfg.kind, tcfg.corpus, s, cfg.cache_dir, progress=progress)
        else:
            splits[s] = load_real_split(tcfg.dataset, cfg.data.root, s)
    fps = {s: hashlib.sha256(json.dumps([tcfg.kind, tcfg.dataset, [(u.utt_id, u.path, u.label) for u in utts]])
                             .encode()).hexdigest()[:16] for s, utts in splits.items()}
    return splits, fps


def read_classes(splits: dict, classes: list[list[str]] | None, slots: int) -> list[list[str]]:
    """Each slot's class names (`classes`, or those of the train split), checked against every split."""
    if classes is None:
        found = check_classes(splits, slot_sep=";" if slots > 1 else None)
        classes = [[c.split(":", 1)[1] for c in found if c.startswith(f"{k}:")] for k in range(slots)] \
            if slots > 1 else [found]
    else:
        check_classes(splits, classes[0])
    for s, utts in splits.items():
        bad = next((u for u in utts if len(u.label.split(";")) != len(classes)), None)
        if bad is not None:
            raise DataError(f"{bad.utt_id} of the {s} split has label {bad.label!r}: expected {len(classes)} "
                            "slot(s) separated by ';'")
    return classes


class PooledDownstream:
    """A classification task's part of run_downstream: its labelled splits (task.dataset), their pooled hidden
    states (qspeech.features.pooled_splits) and the pooled head. classes: each slot's class names, or None for
    those of the train split (`slots` of them, separated by ';' in a label)."""

    head_key: dict = {}
    trainable = ClassificationTask  # a task scoring more than accuracy brings its subclass

    def __init__(self, cfg, classes: list[list[str]] | None = None, slots: int = 1):
        self.cfg, self.classes, self.slots = cfg, classes, slots

    def load(self, progress: bool) -> Splits:
        utts, fps = load_labeled_splits(self.cfg, progress)
        self.classes = read_classes(utts, self.classes, self.slots)
        return Splits(utts, fps)

    def features(self, upstream, upstream_key: str, data: Splits, device, progress: bool) -> dict[str, Pooled]:
        return pooled_splits(upstream, upstream_key, data.utts, data.fingerprints, read_segment,
                             Path(str(self.cfg.cache_dir)), self.cfg.train, device, progress)

    def head(self, upstream, data: Splits, pooled: dict[str, Pooled]) -> ClassificationTask:
        index = [{v: i for i, v in enumerate(values)} for values in self.classes]
        labels = {s: torch.tensor([[index[k][v] for k, v in enumerate(data.utts[s][i].label.split(";"))]
                                   for i in p.kept], dtype=torch.long) for s, p in pooled.items()}
        model = PooledHead(upstream.num_hidden, upstream.hidden_size, [len(v) for v in self.classes], self.cfg.task)
        kept = {s: [data.utts[s][i] for i in p.kept] for s, p in pooled.items()}
        return self.trainable(model, pooled, labels, kept, self.classes, self.cfg.task.lr)


def classification_task(kind: str, config: type, classes: list[str] | None = None, slots: int = 1) -> Task:
    """The TASK of a classification task module: scored by accuracy (all slots right)."""
    return Task(kind, config, partial(PooledDownstream, classes=None if classes is None else [list(classes)],
                                      slots=slots), (ACCURACY,))
