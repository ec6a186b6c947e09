"""Utterance-level classification on a frozen upstream (SUPERB KS, SID, IC): s3prl 0.4.18's head for all three
(`s3prl/nn/linear.py` MeanPoolingLinear = `s3prl/nn/common.py` UtteranceLevel with hidden_sizes=[256]):
weighted sum of all hidden states -> Linear(D, 256) -> mean over valid frames -> Linear(256, classes), no
non-linearity; cross-entropy (IC: one per slot, summed), accuracy.

Everything before the last Linear is linear in the hidden states, so mean pooling commutes with the weighted
sum and the first Linear: the head on each hidden state's mean over frames computes exactly the recipe's
head on the frames (tests/test_tasks_utterance.py checks it). Each utterance is therefore pooled once, from
the feature cache (or the live upstream when the cache is off), and training touches L x D numbers per
utterance.

A task module (ks.py, sid.py, ic.py) gives its config (a UtteranceConfig), its labelled splits and classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qspeech.checks import choice, integer, number
from qspeech.data.synth_tasks import SynthConfig
from qspeech.errors import ConfigError, DataError, TrainingError
from qspeech.identity import identity_dict, stable_hash
from qspeech.tasks.asr import Featurizer
from qspeech.tasks.config import TaskConfig
from qspeech.tasks.metrics import TaskMetrics

log = logging.getLogger(__name__)

__all__ = ["UtteranceConfig", "PooledHead", "pool_hidden_states", "run_classification"]


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


def pool_hidden_states(hs: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(B, F, L, D) hidden states and valid frames -> (B, L, D) means over the valid frames."""
    mask = (torch.arange(hs.shape[1])[None, :] < lens[:, None]).to(hs.dtype)[:, :, None, None]
    return (hs * mask).sum(1) / lens.clamp(min=1)[:, None, None].to(hs.dtype)


def _pooled_split(upstream, upstream_key, data_fp, utts, read, cache_dir, trcfg, device, use_cache, progress,
                  desc) -> tuple[torch.Tensor, list[int], dict]:
    """(N, L, D) pooled hidden states of the readable utterances, their indices, and how they were made."""
    from qspeech import feature_cache

    info: dict = {}
    if use_cache:
        store, status = feature_cache.load_or_build(upstream, upstream_key, data_fp, utts, read, cache_dir,
                                                    device=device, batch_s=trcfg.feature_batch_s, progress=progress,
                                                    desc=desc)
        index = {u.utt_id: i for i, u in enumerate(utts)}
        kept = [index[i] for i in store.utt_ids]
        pooled = torch.stack([torch.from_numpy(np.asarray(store.get(k), dtype=np.float32)).mean(0)
                              for k in range(len(store))]) if kept else torch.empty(0)
        info = {"status": status, "skipped": list(store.skipped), "utts_per_s": store.meta.get("upstream_utts_per_s")}
        return pooled, kept, info
    import time

    out, kept, skipped, secs = [], [], [], 0.0
    for batch in feature_cache.length_batches(utts, trcfg.feature_batch_s):
        wavs, ok, failed = feature_cache.read_waves(utts, batch, read)
        skipped += [p for p, _ in failed]
        if ok:
            t0 = time.perf_counter()
            hs, lens = feature_cache.run_upstream(upstream, wavs, device)
            secs += time.perf_counter() - t0
            out.append(pool_hidden_states(hs.cpu(), lens))
            kept += ok
    order = np.argsort(kept)
    pooled = torch.cat(out)[torch.as_tensor(order)] if out else torch.empty(0)
    return pooled, sorted(kept), {"status": "off", "skipped": skipped,
                                  "utts_per_s": len(kept) / secs if secs else None}


# ---------------------------------------------------------------------------------------------- task
class ClassificationTask:
    """The `Trainable` for qspeech.train.fit. Selects on dev error (100 - accuracy): fit keeps the lowest."""

    select_metric = "err"

    def __init__(self, model: PooledHead, feats: dict, labels: dict, lengths: list[float], lr: float):
        self.model, self.feats, self.labels, self.lengths, self.lr = model, feats, labels, lengths, lr
        self.last_predictions: dict[str, torch.Tensor] = {}

    def train_lengths(self):
        return self.lengths

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


def _run_key(cfg, upstream_key: str, data_fps: dict) -> str:
    return stable_hash({"upstream": upstream_key, "task": identity_dict(cfg.task), "train": identity_dict(cfg.train),
                        "data": data_fps, "seed": cfg.seed}, 20)


def run_classification(cfg, upstream, run_dir: Path, upstream_key: str, splits: dict, slots: list[list[str]],
                       read: Callable[[str], np.ndarray], data_fps: dict, progress: bool = True,
                       on_step=None) -> TaskMetrics:
    """Train the pooled head on `splits` ({train, dev, test}: LabeledUtterance lists whose labels are the slot
    values joined by ';'), select on dev accuracy, report test accuracy (all slots right)."""
    from qspeech.atomic import torch_save_atomic, write_text_atomic
    from qspeech.seeding import seed_everything
    from qspeech.train import fit, resolve_device, torch_threads

    tcfg, trcfg = cfg.task, cfg.train
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    index = [{v: i for i, v in enumerate(values)} for values in slots]
    with torch_threads(trcfg.num_threads):
        device = resolve_device(trcfg)
        orig_device = next(iter(upstream.parameters()), torch.empty(0)).device
        upstream.eval().requires_grad_(False).to(device)
        from qspeech import feature_cache

        secs = sum(u.duration_s for s in splits.values() for u in s)
        est = feature_cache.estimate_bytes(upstream, secs)
        use_cache = trcfg.cache_features is True or (trcfg.cache_features == "auto" and est <= trcfg.cache_max_gb * 1e9)
        feats, labels, kept, infos = {}, {}, {}, {}
        try:
            for s, utts in splits.items():
                feats[s], kept[s], infos[s] = _pooled_split(upstream, upstream_key, data_fps[s], utts, read,
                                                            Path(str(cfg.cache_dir)), trcfg, device, use_cache,
                                                            progress, f"upstream {s}")
                if not kept[s]:
                    raise DataError(f"no readable audio in the {s} split")
                labels[s] = torch.tensor([[index[k][v] for k, v in enumerate(utts[i].label.split(";"))]
                                          for i in kept[s]], dtype=torch.long)
        finally:
            upstream.to(orig_device)

        seed_everything(int(cfg.seed))
        model = PooledHead(upstream.num_hidden, upstream.hidden_size, [len(v) for v in slots], tcfg)
        lengths = [splits["train"][i].duration_s for i in kept["train"]]
        task = ClassificationTask(model, feats, labels, lengths, tcfg.lr)
        state_dir = Path(trcfg.ckpt_dir) if trcfg.ckpt_dir else Path(str(cfg.cache_dir)) / "runs" / _run_key(
            cfg, upstream_key, data_fps)
        res = fit(task, trcfg, seed=int(cfg.seed), state_dir=state_dir, run_dir=run_dir, progress=progress,
                  on_step=on_step, desc=f"{tcfg.kind} {tcfg.name}")
        with torch.no_grad():
            test = task.evaluate("test", device)
    if not np.isfinite(test["acc"]):
        raise TrainingError("test accuracy is not finite")

    pred = task.last_predictions["test"]
    rows = ["utt_id\tlabel\tpredicted\n"] + [
        f"{splits['test'][i].utt_id}\t{splits['test'][i].label}\t"
        f"{';'.join(slots[k][int(p)] for k, p in enumerate(pred[j]))}\n" for j, i in enumerate(kept["test"])]
    write_text_atomic(run_dir / "test_predictions.tsv", "".join(rows))
    torch_save_atomic({"model": model.state_dict(), "classes": slots, "task": dataclasses.asdict(tcfg),
                       "best_step": res.best_step}, run_dir / "downstream.pt")
    rates = [(len(kept[s]), len(kept[s]) / infos[s]["utts_per_s"]) for s in splits if infos[s]["utts_per_s"]]
    n_up, t_up = sum(n for n, _ in rates), sum(t for _, t in rates)
    skipped = sorted({p for i in infos.values() for p in i["skipped"]})
    statuses = [i["status"] for i in infos.values()]
    return TaskMetrics(
        metric="acc", value=float(test["acc"]), higher_is_better=True,
        dev_acc=float(res.best.get("acc", float("nan"))), steps=res.steps, best_step=res.best_step,
        train_wall_s=round(res.train_wall_s, 3), upstream_utts_per_s=round(n_up / t_up, 3) if t_up else None,
        train_utts_per_s=round(res.train_items_per_s, 3),
        layer_weights=[round(w, 6) for w in model.featurizer.layer_weights()],
        n_train=len(kept["train"]), n_dev=len(kept["dev"]), n_test=len(kept["test"]), skipped_audio=len(skipped),
        feature_cache="off" if "off" in statuses else ("hit" if all(s == "hit" for s in statuses) else "miss"),
        resumed_from_step=res.resumed_from, device=str(device), head_params=sum(p.numel() for p in model.parameters()),
        n_classes=[len(v) for v in slots], majority_acc=round(_majority(labels["train"], labels["test"]), 2),
    )


def _majority(train: torch.Tensor, test: torch.Tensor) -> float:
    """Test accuracy (percent) of always answering the train split's most frequent label: the chance line."""
    values, counts = torch.unique(train, dim=0, return_counts=True)
    return 100.0 * float((test == values[counts.argmax()]).all(dim=1).float().mean())


def load_labeled_splits(cfg, progress: bool = True) -> tuple[dict, dict]:
    """({train, dev, test}: LabeledUtterance lists, {split: fingerprint of its content}) of cfg.task's data set:
    the synthesized corpus (task.dataset=synth) or the real one under data.root."""
    from qspeech.data.superb_sets import load_real_split
    from qspeech.data.synth_tasks import load_synth_split

    tcfg = cfg.task
    splits = {}
    for s in ("train", "dev", "test"):
        if tcfg.dataset == "synth":
            splits[s] = load_synth_split(tcfg.kind, tcfg.corpus, s, cfg.cache_dir, progress=progress)
        else:
            splits[s] = load_real_split(tcfg.dataset, cfg.data.root, s)
    fps = {s: hashlib.sha256(json.dumps([tcfg.kind, tcfg.dataset, [(u.utt_id, u.path, u.label) for u in utts]])
                             .encode()).hexdigest()[:16] for s, utts in splits.items()}
    return splits, fps


def run_labeled(cfg, upstream, run_dir, upstream_key, classes: list[list[str]] | None, slots: int = 1,
                progress: bool = True, on_step=None) -> TaskMetrics:
    """A classification task end to end: its splits, their classes checked (`classes` per slot, or those of
    the train split), the pooled head trained and tested."""
    from qspeech.data.labeled import check_classes, read_segment

    splits, fps = load_labeled_splits(cfg, progress)
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
    return run_classification(cfg, upstream, run_dir, upstream_key, splits, classes, read_segment, fps,
                              progress=progress, on_step=on_step)
