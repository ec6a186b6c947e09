"""SUPERB ASR downstream (s3prl's recipe): frozen upstream -> learnable weighted sum of all hidden states
-> SpecAugment (training only) -> Linear -> BiLSTMs -> Linear -> characters, CTC (blank 0), greedy decoding.

Reference: s3prl 0.4.18 `s3prl/problem/asr/superb_asr.py` (featurizer normalize=False, LSTM 2x1024
bidirectional with dropout 0.2 after each layer, Linear projection 1024 in front, SpecAugment with
time warp 5, 4 frequency masks of width <= 50, 2 time masks of width <= 40, Adam 1e-4, grad clip 1,
200k steps, eval every 2k) and `s3prl/downstream/asr/model.py` (RNNLayer: pack -> LSTM -> dropout; here
qspeech.tasks.rnn's BiLSTM, the same function on padded batches, faster on CPU).

task.s3prl_exact (on for task=asr) evaluates as s3prl's SUPERB runner does (run_downstream.py with
downstream/asr/config.yaml, eval_batch_size 1): every dev/test utterance through the upstream and the head
alone, and frame lengths cut as its Featurizer cuts them (s3prl/upstream/interfaces.py Featurizer.tolist:
round(samples / downsample_rate), at most the frames computed). task.vocab=s3prl is that runner's dictionary
and specaug.max_width_exclusive its SpecAugment draw (s3prl/downstream/specaug.py).

This module holds the config, SpecAugment, the head and how characters read (ASRTask); the run is
qspeech.tasks.downstream.run_downstream, the features (s3prl_exact's frame lengths too) qspeech.features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import qspeech.data
from qspeech.checks import choice, integer, need, number
from qspeech.errors import ConfigError, DataError
from qspeech.tasks.config import Task, TaskConfig
from qspeech.tasks.ctc import CTCDownstream, CTCTask
from qspeech.tasks.downstream import Splits
from qspeech.tasks.featurizer import Featurizer
from qspeech.tasks.metrics import Metric
from qspeech.tasks.metrics import cer as cer_fn
from qspeech.tasks.metrics import wer as wer_fn
from qspeech.tasks.rnn import LSTM, BiLSTM
from qspeech.tasks.vocab import VOCABS, make_vocab


# --------------------------------------------------------------------------------------------- config
@dataclass
class SpecAugConfig:
    enabled: bool = True
    time_warp_window: int = 5  # 0: no time warp
    freq_mask_width: list[int] = field(default_factory=lambda: [0, 50])  # [min, max] feature dims per mask
    num_freq_mask: int = 4
    time_mask_width: list[int] = field(default_factory=lambda: [0, 40])  # [min, max] frames per mask
    num_time_mask: int = 2
    # Mask widths drawn from [min, max) as s3prl's SUPERB runner draws them (s3prl/downstream/specaug.py:
    # randint(min, max)); false: [min, max] as s3prl.nn.specaug (randint(min, max + 1)), qspeech's earlier draw,
    # kept by asr_small.
    max_width_exclusive: bool = True

    def __post_init__(self):
        for k in ("freq_mask_width", "time_mask_width"):
            v = getattr(self, k)
            need(isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v)
                 and 0 <= v[0] <= v[1], k, v, "must be [min, max] integers with 0 <= min <= max")
            need(not self.max_width_exclusive or v[0] < v[1] or v[1] == 0, k, v,
                 "must have min < max when max_width_exclusive=true (widths are drawn from [min, max))")
        for k in ("num_freq_mask", "num_time_mask", "time_warp_window"):
            integer(self, k, 0)


@dataclass
class ASRConfig(TaskConfig):
    """The `task` config group for kind=asr; the defaults are conf/task/asr.yaml (SUPERB's recipe)."""

    name: str = "asr"
    kind: str = "asr"
    # s3prl's Featurizer option: layer_norm (no affine) of each hidden state before the weighted sum.
    # The SUPERB recipes leave it off.
    featurizer_normalize: bool = False
    # Concatenate this many consecutive frames before the projection (s3prl RNNs' sample_style=concat;
    # 1 in the SUPERB recipe for 20 ms upstreams). Divides the BiLSTM's work.
    frame_stride: int = 1
    project_dim: int = 1024
    hidden_size: int = 1024  # per direction
    num_layers: int = 2
    bidirectional: bool = True
    dropout: float = 0.2
    lr: float = 1.0e-4  # Adam, no scheduler
    zero_infinity: bool = True  # CTC: utterances with more labels than frames contribute 0
    select_metric: str = "wer"  # dev metric that picks the best checkpoint: wer (SUPERB) | cer
    # null: the weighted sum of all hidden states (SUPERB); k: hidden state k alone (0 = CNN projection),
    # to see what each layer holds (the README's diagnosis table).
    layer: int | None = None
    specaug: SpecAugConfig = field(default_factory=SpecAugConfig)
    # Evaluate as s3prl's SUPERB runner: each dev/test utterance alone through the upstream and the head (no
    # padding reaches the CNN's first GroupNorm), frame lengths round(samples / 320) capped at the frames
    # computed (training batches included). false: padded batches of train.eval_batch_size, the CNN's own
    # output lengths (asr_small).
    s3prl_exact: bool = True
    # s3prl: s3prl's dictionary (fairseq's <s> <pad> </s> <unk> + char.dict, 32 symbols, targets ending '|' </s>);
    # qspeech: 29 symbols (qspeech/tasks/vocab.py).
    vocab: str = "s3prl"

    def __post_init__(self):
        super().__post_init__()
        choice(self, "kind", ("asr",))
        choice(self, "s3prl_exact", (True, False))
        choice(self, "vocab", tuple(VOCABS))
        for k in ("project_dim", "hidden_size", "num_layers", "frame_stride"):
            integer(self, k, 1)
        number(self, "dropout", 0, 1, hi_open=True)
        number(self, "lr", 0, lo_open=True)
        choice(self, "select_metric", ("wer", "cer"))
        integer(self, "layer", 0, optional=True)


# ---------------------------------------------------------------------------------------------- model
class SpecAugment(nn.Module):
    """s3prl.nn.specaug.SpecAug re-implemented (s3prl.nn imports torchaudio): time warp, freq masks,
    time masks with zeros, on (B, T, D) features; padding re-zeroed. Active in train mode only."""

    def __init__(self, cfg: SpecAugConfig):
        super().__init__()
        self.cfg = cfg

    def _warp(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, D)
        w, t = self.cfg.time_warp_window, x.shape[0]
        if t - w <= w:
            return x
        center = int(torch.randint(w, t - w, (1,)))
        warped = int(torch.randint(center - w, center + w, (1,))) + 1
        x4 = x[None, None]
        left = F.interpolate(x4[:, :, :center], (warped, x.shape[1]), mode="bicubic", align_corners=False)
        right = F.interpolate(x4[:, :, center:], (t - warped, x.shape[1]), mode="bicubic", align_corners=False)
        return torch.cat([left, right], dim=2)[0, 0]

    def draw_widths(self, batch: int, num: int, width: Sequence[int], device=None) -> torch.Tensor:
        """(batch, num) mask widths from [min, max) (max_width_exclusive, s3prl's SUPERB runner) or [min, max]."""
        high = int(width[1]) + (0 if self.cfg.max_width_exclusive else 1)
        return torch.randint(int(width[0]), high, (batch, num), device=device)

    def _mask(self, x: torch.Tensor, dim: int, width: Sequence[int], num: int) -> torch.Tensor:
        if num == 0 or width[1] == 0:
            return x
        B, size = x.shape[0], x.shape[dim]
        lengths = self.draw_widths(B, num, width, x.device).unsqueeze(2)
        pos = torch.randint(0, max(1, size - int(lengths.max())), (B, num), device=x.device).unsqueeze(2)
        ar = torch.arange(size, device=x.device)[None, None, :]
        mask = ((pos <= ar) & (ar < pos + lengths)).any(dim=1)  # (B, size)
        mask = mask.unsqueeze(2) if dim == 1 else mask.unsqueeze(1)
        return x.masked_fill(mask, 0.0)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.cfg.enabled):
            return x
        if self.cfg.time_warp_window > 0:
            rows = []
            for i, n in enumerate(lens.tolist()):
                y = x[i].clone()
                y[:n] = self._warp(x[i, :n])
                rows.append(y)
            x = torch.stack(rows)
        x = self._mask(x, 2, self.cfg.freq_mask_width, self.cfg.num_freq_mask)
        x = self._mask(x, 1, self.cfg.time_mask_width, self.cfg.num_time_mask)
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lens.to(x.device)[:, None]
        return x * valid.unsqueeze(-1).to(x.dtype)


class ASRHead(nn.Module):
    """Featurizer -> SpecAugment -> Linear(D, project_dim) -> [BiLSTM -> dropout] x num_layers -> Linear."""

    def __init__(self, num_hidden: int, hidden_dim: int, vocab_size: int, cfg: ASRConfig):
        super().__init__()
        if cfg.layer is not None and cfg.layer >= num_hidden:
            raise ConfigError(f"task.layer={cfg.layer}: the upstream has hidden states 0..{num_hidden - 1}")
        self.layer = cfg.layer
        self.featurizer = Featurizer(num_hidden, cfg.featurizer_normalize)
        self.specaug = SpecAugment(cfg.specaug)
        self.stride = cfg.frame_stride
        self.proj = nn.Linear(hidden_dim * cfg.frame_stride, cfg.project_dim)
        dirs = 2 if cfg.bidirectional else 1
        layer = BiLSTM if cfg.bidirectional else LSTM
        self.rnns = nn.ModuleList(layer(cfg.project_dim if i == 0 else cfg.hidden_size * dirs, cfg.hidden_size)
                                  for i in range(cfg.num_layers))
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_size * dirs, vocab_size)

    def forward(self, hs: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hs: (B, F, L, D) hidden states; lens: (B,) frames. Returns logits (B, F // stride, vocab), lengths."""
        x = self.featurizer(hs) if self.layer is None else hs[:, :, self.layer]
        x = self.specaug(x, lens)
        if self.stride > 1:
            B, T, D = x.shape
            T = T // self.stride
            x = x[:, : T * self.stride].reshape(B, T, D * self.stride)
            lens = torch.div(lens, self.stride, rounding_mode="floor")
        x = self.proj(x)
        lens_ = lens.clamp(min=1)
        for rnn in self.rnns:
            x = self.dropout(rnn(x, lens_))
        return self.out(x), lens


# ---------------------------------------------------------------------------------------------- task
class ASRTask(CTCTask):
    """CTC over characters (task.vocab); dev WER (or CER: task.select_metric) picks the checkpoint. With
    task.s3prl_exact every split is evaluated one utterance at a time (s3prl's eval_batch_size 1)."""

    def __init__(self, model: ASRHead, sources: dict, cfg: ASRConfig, eval_batch_size: int = 16):
        self.vocab = make_vocab(cfg.vocab)
        targets = {s: [self.vocab.encode(u.text) for u in src.utts] for s, src in sources.items()}
        super().__init__(model, sources, targets, cfg.lr, self.vocab.blank, cfg.zero_infinity, eval_batch_size)
        self.cfg = cfg
        self.select_metric = cfg.select_metric

    def hypothesis(self, ids):
        return self.vocab.decode(ids)

    def reference(self, split, i):
        return self.sources[split].utts[i].text

    def scores(self, refs, hyps):
        return {"wer": wer_fn(refs, hyps), "cer": cer_fn(refs, hyps)}

    def saved(self) -> dict:
        return {"vocab": self.vocab.symbols}


class ASRDownstream(CTCDownstream):
    """ASR's part of run_downstream: data=...'s splits (and eval_data's test split, scored after training),
    the ASR head and its ASRTask."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.s3prl_exact = cfg.task.s3prl_exact

    def load(self, progress: bool) -> Splits:
        data = super().load(progress)
        eval_data = getattr(self.cfg, "eval_data", None)
        if eval_data is not None:  # a second test set, scored after training; never selects anything
            data.utts["eval"] = list(qspeech.data.load_split(eval_data, "test", self.cache_dir))
            if not data.utts["eval"]:
                raise DataError(f"the test split of eval_data={eval_data.name} is empty")
            data.fingerprints["eval"] = qspeech.data.config_fingerprint(eval_data, "test")
            data.eval_name = eval_data.name
        return data

    def head(self, upstream, data: Splits, sources: dict) -> ASRTask:
        tcfg = self.cfg.task
        model = ASRHead(upstream.num_hidden, upstream.hidden_size, len(make_vocab(tcfg.vocab)), tcfg)
        return ASRTask(model, sources, tcfg, 1 if tcfg.s3prl_exact else self.cfg.train.eval_batch_size)


# found by qspeech.tasks (task.kind=asr); ASR's result.json has never carried higher_is_better
TASK = Task("asr", ASRConfig, ASRDownstream, (Metric("wer", higher_is_better=False),
                                              Metric("cer", higher_is_better=False)), states_direction=False)
