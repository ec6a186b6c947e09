"""What the CTC tasks (ASR characters, PR phones) share: greedy (best-path) decoding, `CTCTask` (the trainable
CTC head over frame features) and `CTCDownstream` (their part of run_downstream: data=... splits and frame
features, cached or live). A CTC task says how label ids read as text (`hypothesis`, `reference`) and scores
a split (`scores`, by the names of the metrics its Task declares)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import qspeech.data
from qspeech.errors import DataError
from qspeech.features import frame_sources
from qspeech.tasks.downstream import SPLITS, Splits


def greedy_collapse(ids, blank: int = 0) -> list[int]:
    """Collapse repeated labels, then remove blanks: [a a _ a b b] -> [a a b]."""
    out, prev = [], None
    for i in ids:
        i = int(i)
        if i != prev and i != blank:
            out.append(i)
        prev = i
    return out


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor | None = None, blank: int = 0) -> list[list[int]]:
    """logits: (B, T, V) (or (T, V)); lengths: (B,) valid frames. Returns label ids per utterance."""
    if logits.dim() == 2:
        logits = logits.unsqueeze(0)
    best = logits.argmax(dim=-1).cpu()
    if lengths is None:
        lengths = torch.full((best.shape[0],), best.shape[1], dtype=torch.long)
    return [greedy_collapse(best[b, : int(n)].tolist(), blank) for b, n in enumerate(lengths.tolist())]


class CTCTask:
    """The trainable (qspeech.train.fit, run_downstream's Head) of a CTC head over frame features:
    targets[split][i] are the label ids of sources[split].utts[i]; a subclass says how ids read as text
    (`hypothesis`, `reference`), scores a split (`scores`) and what downstream.pt keeps (`saved`)."""

    select_metric = "wer"
    test_autocast = True

    def __init__(self, model: nn.Module, sources: dict, targets: dict, lr: float, blank: int = 0,
                 zero_infinity: bool = True, eval_batch_size: int = 16):
        self.model, self.sources, self.targets, self.lr = model, sources, targets, lr
        self.blank, self.zero_infinity, self.eval_batch_size = blank, zero_infinity, eval_batch_size
        self.last_predictions: dict[str, list[tuple[str, str, str]]] = {}

    def hypothesis(self, ids: list[int]) -> str:
        raise NotImplementedError

    def reference(self, split: str, i: int) -> str:
        raise NotImplementedError

    def scores(self, refs: list[str], hyps: list[str]) -> dict:
        raise NotImplementedError

    def saved(self) -> dict:
        raise NotImplementedError

    def train_lengths(self):
        return self.sources["train"].lengths_s

    def make_optimizer(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)

    def load_batch(self, indices, split="train"):
        """The CPU half of a batch (read, decode, pad): what a DataLoader worker prepares ahead."""
        return self.sources[split].load(indices)

    def finish_batch(self, payload, device, split="train"):
        """The batch from load_batch's payload: features on the device (the live upstream runs here), targets."""
        got = self.sources[split].finish(payload, device)
        if got is None:
            return None
        feats, lens, kept = got
        tg = [self.targets[split][i] for i in kept]
        return {"feats": feats, "lens": lens, "targets": torch.tensor([c for t in tg for c in t], dtype=torch.long),
                "target_lens": torch.tensor([len(t) for t in tg], dtype=torch.long), "indices": kept}

    def make_batch(self, indices, device, split="train"):
        return self.finish_batch(self.load_batch(indices, split), device, split)

    def loss(self, batch):
        logits, lens = self.model(batch["feats"], batch["lens"])
        logp = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, B, V)
        loss = F.ctc_loss(logp, batch["targets"].to(logp.device), lens.to(logp.device),
                          batch["target_lens"].to(logp.device), blank=self.blank, reduction="mean",
                          zero_infinity=self.zero_infinity)
        return loss, len(batch["indices"])

    def evaluate(self, split, device):
        src = self.sources[split]
        order = sorted(range(len(src)), key=lambda i: src.lengths_s[i])
        refs, hyps, preds = [], [], []
        for b in range(0, len(order), self.eval_batch_size):
            batch = self.make_batch(order[b:b + self.eval_batch_size], device, split)
            if batch is None:
                continue
            logits, lens = self.model(batch["feats"], batch["lens"])
            for i, ids in zip(batch["indices"], greedy_decode(logits.float(), lens, self.blank)):
                hyp, ref = self.hypothesis(ids), self.reference(split, i)
                refs.append(ref)
                hyps.append(hyp)
                preds.append((src.utts[i].utt_id, ref, hyp))
        self.last_predictions[split] = preds
        return self.scores(refs, hyps)

    def predictions_tsv(self, split: str) -> str:
        return "utt_id\tref\thyp\n" + "".join("\t".join(row) + "\n" for row in self.last_predictions.get(split, []))

    def feature_stats(self) -> dict:
        return {s: src.stats() for s, src in self.sources.items()}

    def extra_metrics(self) -> dict:
        return {}


class CTCDownstream:
    """A CTC task's part of run_downstream up to its head: the train/dev/test splits of data=... and their
    frame features (the feature cache shared by every task on the same data and upstream). A subclass builds
    the head and its CTCTask (`head`)."""

    # The head's resume key has had "head": 2 since ASR's head became rnn.BiLSTM (its resumable state holds
    # fwd/bwd parameters; 1: nn.LSTM's): never resume across. PR's key took the same input.
    head_key = {"head": 2}
    s3prl_exact = False  # frame lengths and per-utterance evaluation as s3prl's runner (see features.frame_sources)

    def __init__(self, cfg):
        self.cfg = cfg
        self.cache_dir = Path(str(cfg.cache_dir))

    def load(self, progress: bool) -> Splits:
        utts = {s: list(qspeech.data.load_split(self.cfg.data, s, self.cache_dir)) for s in SPLITS}
        for s in SPLITS:
            if not utts[s]:
                raise DataError(f"the {s} split of data={self.cfg.data.name} is empty")
        return Splits(utts, {s: qspeech.data.config_fingerprint(self.cfg.data, s) for s in SPLITS})

    def features(self, upstream, upstream_key: str, data: Splits, device, progress: bool) -> dict:
        return frame_sources(upstream, upstream_key, data.utts, data.fingerprints, qspeech.data.read_audio,
                             self.cache_dir, self.cfg.train, device, progress, s3prl_exact=self.s3prl_exact)
