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
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qspeech.checks import choice, integer, need, number
from qspeech.errors import ConfigError, DataError
from qspeech.identity import identity_dict, stable_hash
from qspeech.tasks.config import Task, TaskConfig
from qspeech.tasks.ctc import greedy_decode
from qspeech.tasks.metrics import TaskMetrics
from qspeech.tasks.rnn import LSTM, BiLSTM
from qspeech.tasks.metrics import cer as cer_fn
from qspeech.tasks.metrics import wer as wer_fn
from qspeech.tasks.vocab import VOCABS, make_vocab

log = logging.getLogger(__name__)


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
class Featurizer(nn.Module):
    """Softmax-weighted sum of all hidden states (s3prl's Featurizer, weights initialised to 0 = uniform)."""

    def __init__(self, num_layers: int, normalize: bool = False):
        super().__init__()
        self.normalize = normalize
        self.weights = nn.Parameter(torch.zeros(num_layers))

    def layer_weights(self) -> list[float]:
        return F.softmax(self.weights.detach().float(), dim=-1).tolist()

    def forward(self, hs: torch.Tensor) -> torch.Tensor:
        """hs: (B, F, L, D) -> (B, F, D)."""
        if self.normalize:
            hs = F.layer_norm(hs, hs.shape[-1:])
        w = F.softmax(self.weights, dim=-1).to(hs.dtype)
        return torch.einsum("bfld,l->bfd", hs, w)


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


# ------------------------------------------------------------------------------------- feature sources
def s3prl_frame_lengths(wav_lens: torch.Tensor, downsample_rate: int, frames: int) -> torch.Tensor:
    """Frame lengths as s3prl's Featurizer cuts features (s3prl/upstream/interfaces.py Featurizer.tolist:
    f[:round(len(wav) / downsample_rate)]): Python's round (half to even), at most the `frames` computed.
    For one utterance alone this is the CNN's own output length; in a padded batch a shorter utterance can
    keep one more frame, computed partly over the padding."""
    n = torch.round(wav_lens.detach().to("cpu", torch.float64) / int(downsample_rate)).to(torch.long)
    return n.clamp(max=int(frames)).to(wav_lens.device)


class S3PRLLengths:
    """An upstream whose output lengths are s3prl_frame_lengths (task.s3prl_exact); everything else is the
    upstream's."""

    def __init__(self, upstream):
        self.upstream = upstream

    def __getattr__(self, name):
        return getattr(self.upstream, name)

    def __call__(self, wavs: torch.Tensor, wav_lens: torch.Tensor):
        from qspeech.upstream.model import UpstreamOutput

        out = self.upstream(wavs, wav_lens)
        frames = out.hidden_states[0].shape[1]
        return UpstreamOutput(out.hidden_states, s3prl_frame_lengths(wav_lens, self.upstream.downsample_rate, frames))


class CachedSource:
    """Hidden states from the on-disk feature cache."""

    def __init__(self, store, utts: Sequence):
        by_id = {u.utt_id: u for u in utts}
        self.store = store
        self.utts = [by_id[i] for i in store.utt_ids]
        rate = store.meta["downsample_rate"]
        self.lengths_s = [n * rate / 16_000 for n in store.frames]
        self.skipped = list(store.skipped)

    def __len__(self):
        return len(self.utts)

    def batch(self, indices, device):
        feats, lens = self.store.batch(indices)
        return feats.to(device, non_blocking=True), lens, list(indices)


class LiveSource:
    """Runs the frozen upstream on every batch (no cache). Unreadable files are skipped with a warning."""

    def __init__(self, upstream, utts: Sequence, read_audio, device):
        self.upstream, self.utts, self.read_audio, self.device = upstream, list(utts), read_audio, device
        self.lengths_s = [u.duration_s for u in self.utts]
        self.skipped: list[str] = []
        self.upstream_s, self.upstream_utts = 0.0, 0

    def __len__(self):
        return len(self.utts)

    def batch(self, indices, device):
        from qspeech.feature_cache import read_waves, run_upstream

        wavs, kept, failed = read_waves(self.utts, indices, self.read_audio)
        for path, e in failed:
            if path not in self.skipped:
                self.skipped.append(path)
                log.warning("skipping unreadable audio %s: %s (%d skipped so far)", path, e, len(self.skipped))
        if not kept:
            return None
        t0 = time.perf_counter()
        feats, lens = run_upstream(self.upstream, wavs, self.device)
        self.upstream_s += time.perf_counter() - t0
        self.upstream_utts += len(kept)
        return feats.to(device), lens, kept


# ---------------------------------------------------------------------------------------------- task
class CTCTask:
    """The `Trainable` for qspeech.train.fit of a CTC head over frame features (ASR characters, PR phones):
    targets[split][i] are the label ids of sources[split].utts[i]; a subclass says how ids read as text
    (`hypothesis`, `reference`) and scores a split (`scores`)."""

    select_metric = "wer"

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

    def train_lengths(self):
        return self.sources["train"].lengths_s

    def make_optimizer(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)

    def make_batch(self, indices, device, split="train"):
        got = self.sources[split].batch(indices, device)
        if got is None:
            return None
        feats, lens, kept = got
        tg = [self.targets[split][i] for i in kept]
        return {"feats": feats, "lens": lens, "targets": torch.tensor([c for t in tg for c in t], dtype=torch.long),
                "target_lens": torch.tensor([len(t) for t in tg], dtype=torch.long), "indices": kept}

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


# ------------------------------------------------------------------------------------------ data api
def data_api():
    """qspeech.data's functions (a seam for tests): load_split, read_audio, config_fingerprint."""
    import qspeech.data as d

    return d


def _run_key(cfg, upstream_key: str, data_fps: dict) -> str:
    # head 2: the resumable state holds rnn.BiLSTM's fwd/bwd parameters (1: nn.LSTM's); never resume across
    return stable_hash({"upstream": upstream_key, "task": identity_dict(cfg.task), "train": identity_dict(cfg.train),
                        "data": data_fps, "seed": cfg.seed, "head": 2}, 20)


def feature_sources(upstream, upstream_key: str, utts: dict, data_fps: dict, read_audio, cache_dir: Path, trcfg,
                    device, progress: bool, s3prl_exact: bool = False) -> tuple[dict, tuple[list, list] | None]:
    """Each split's frame features: CachedSource over the feature cache when it fits train.cache_max_gb (or
    train.cache_features=true), else LiveSource running the upstream. Returns the sources and, when cached,
    (each split's cache status, its (utterances, upstream seconds)) for _metrics; None when live.
    s3prl_exact: s3prl's frame lengths in every split, and every split but train through the upstream one
    utterance at a time (cached under a key of their own)."""
    from qspeech import feature_cache

    if s3prl_exact:
        upstream, upstream_key = S3PRLLengths(upstream), f"{upstream_key}|s3prl_exact"

    est = sum(feature_cache.estimate_bytes(upstream, sum(u.duration_s for u in us)) for us in utts.values())
    use_cache = trcfg.cache_features is True or (trcfg.cache_features == "auto" and est <= trcfg.cache_max_gb * 1e9)
    if trcfg.cache_features == "auto" and not use_cache:
        log.warning("feature cache off: ~%.1f GB of features exceeds train.cache_max_gb=%s", est / 1e9,
                    trcfg.cache_max_gb)
    sources, statuses, up_rates = {}, [], []
    for s in utts:
        if use_cache:
            # batch_s=0: one utterance per upstream call (feature_cache._length_batches)
            batch_s = 0.0 if s3prl_exact and s != "train" else trcfg.feature_batch_s
            store, st = feature_cache.load_or_build(
                upstream, upstream_key, data_fps[s], utts[s], read_audio, cache_dir, device=device,
                batch_s=batch_s, progress=progress, desc=f"upstream {s}")
            statuses.append(st)
            if store.meta.get("upstream_utts_per_s"):
                up_rates.append((len(store), len(store) / store.meta["upstream_utts_per_s"]))
            sources[s] = CachedSource(store, utts[s])
        else:
            sources[s] = LiveSource(upstream, utts[s], read_audio, device)
        if len(sources[s]) == 0:
            raise DataError(f"no readable audio in the {s} split")
    return sources, ((statuses, up_rates) if use_cache else None)


def run_task(cfg, upstream, run_dir: Path, upstream_key: str, progress: bool = True, on_step=None) -> TaskMetrics:
    """Train the ASR head on the frozen upstream's features, select on dev WER, report test WER.
    cfg: the typed run config (its task, train, data, seed and cache_dir; see qspeech.tasks.run_task)."""
    from qspeech.train import torch_threads

    tcfg, trcfg = cfg.task, cfg.train
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with torch_threads(trcfg.num_threads):
        return _run(cfg, tcfg, trcfg, upstream, run_dir, upstream_key, progress, on_step)


def _run(cfg, tcfg, trcfg, upstream, run_dir, upstream_key, progress, on_step) -> TaskMetrics:
    from qspeech.atomic import torch_save_atomic, write_text_atomic
    from qspeech.errors import TrainingError
    from qspeech.seeding import seed_everything
    from qspeech.train import autocast_ctx, fit, resolve_device

    cache_dir = Path(str(cfg.cache_dir))
    data = data_api()
    splits = ("train", "dev", "test")
    utts = {s: list(data.load_split(cfg.data, s, cache_dir)) for s in splits}
    for s in splits:
        if not utts[s]:
            raise DataError(f"the {s} split of data={cfg.data.name} is empty")
    data_fps = {s: data.config_fingerprint(cfg.data, s) for s in splits}
    eval_data = getattr(cfg, "eval_data", None)
    if eval_data is not None:  # a second test set, scored after training; never selects anything
        utts["eval"] = list(data.load_split(eval_data, "test", cache_dir))
        if not utts["eval"]:
            raise DataError(f"the test split of eval_data={eval_data.name} is empty")
        data_fps["eval"] = data.config_fingerprint(eval_data, "test")

    device = resolve_device(trcfg)
    orig_device = next(iter(upstream.parameters()), torch.empty(0)).device  # FBANK has no parameters
    upstream.eval().requires_grad_(False).to(device)

    try:
        sources, cache = feature_sources(upstream, upstream_key, utts, data_fps, data.read_audio, cache_dir, trcfg,
                                         device, progress, s3prl_exact=tcfg.s3prl_exact)
        seed_everything(int(cfg.seed))
        model = ASRHead(upstream.num_hidden, upstream.hidden_size, len(make_vocab(tcfg.vocab)), tcfg)
        task = ASRTask(model, sources, tcfg, 1 if tcfg.s3prl_exact else trcfg.eval_batch_size)
        # the trained head depends on train/dev/test only: runs with and without eval_data share it
        key = _run_key(cfg, upstream_key, {s: data_fps[s] for s in splits})
        state_dir = Path(trcfg.ckpt_dir) if trcfg.ckpt_dir else cache_dir / "runs" / key
        res = fit(task, trcfg, seed=int(cfg.seed), state_dir=state_dir, run_dir=run_dir, progress=progress,
                  on_step=on_step, desc=f"asr {tcfg.name}")
        with torch.no_grad(), autocast_ctx(trcfg, device):
            test = task.evaluate("test", device)
            other = task.evaluate("eval", device) if "eval" in sources else None
        if not np.isfinite(test["wer"]):
            raise TrainingError("test WER is not finite: the test split has no scorable transcripts")
    finally:
        upstream.to(orig_device)

    files = {"test": "test_predictions.tsv", "eval": f"eval_{getattr(eval_data, 'name', '')}_predictions.tsv"}
    for split, preds in task.last_predictions.items():
        if split in files:
            write_text_atomic(run_dir / files[split], "utt_id\tref\thyp\n" + "".join(
                "\t".join(row) + "\n" for row in preds))
    torch_save_atomic({"model": model.state_dict(), "vocab": task.vocab.symbols, "task": dataclasses.asdict(tcfg),
                       "best_step": res.best_step}, run_dir / "downstream.pt")

    metrics = _metrics(test, res, model, sources, cache, device)
    if other is not None:
        metrics.eval = {"data": eval_data.name, "split": "test", "n": len(sources["eval"]),
                        "wer": round(float(other["wer"]), 4), "cer": round(float(other["cer"]), 4)}
    return metrics


def _metrics(test: dict, res, model: ASRHead, sources: dict, cache: tuple[list, list] | None, device) -> TaskMetrics:
    """The run's record. cache: (each split's cache status, its (utterances, upstream seconds)) when the
    features were cached; None when the upstream ran live (the sources timed it)."""
    if cache is not None:
        n, secs = sum(k for k, _ in cache[1]), sum(t for _, t in cache[1])
    else:
        n, secs = sum(x.upstream_utts for x in sources.values()), sum(x.upstream_s for x in sources.values())
    up_rate = n / secs if secs else None
    skipped = sorted({p for s_, src in sources.items() if s_ != "eval" for p in src.skipped})
    n_used = {s: len(src) - (len(src.skipped) if isinstance(src, LiveSource) else 0) for s, src in sources.items()}
    return TaskMetrics(
        metric="wer",
        value=float(test["wer"]),
        dev_wer=float(res.best.get("wer", float("nan"))),
        cer=float(test["cer"]),
        dev_cer=float(res.best.get("cer", float("nan"))),
        steps=res.steps,
        best_step=res.best_step,
        train_wall_s=round(res.train_wall_s, 3),
        upstream_utts_per_s=round(up_rate, 3) if up_rate else None,
        train_utts_per_s=round(res.train_items_per_s, 3),
        layer_weights=[round(w, 6) for w in model.featurizer.layer_weights()],
        n_train=n_used["train"],
        n_dev=n_used["dev"],
        n_test=n_used["test"],
        skipped_audio=len(skipped),
        feature_cache=("hit" if all(s == "hit" for s in cache[0]) else "miss") if cache is not None else "off",
        resumed_from_step=res.resumed_from,
        device=str(device),
        head_params=sum(p.numel() for p in model.parameters()),
    )


TASK = Task("asr", ASRConfig, run_task)  # found by qspeech.tasks (task.kind=asr)
