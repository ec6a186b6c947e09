"""A task's upstream features, cached or live: the one place that decides between the on-disk feature cache
(qspeech.feature_cache) and running the frozen upstream on every batch, for frame-level tasks (ASR, PR:
`frame_sources`) and utterance-level ones (KS, SID, IC: `pooled_splits`, each utterance's hidden states
averaged over its frames once). Each split says how its features were made (`SplitStats`), summarized by
`summary` for the task's record.

One precision for every split (train.feature_precision, `at_precision`): the upstream runs in float32, or
under bf16 autocast, whatever autocast the head's training or evaluation runs under, so the head is scored
on features of the precision it was trained on. A frame source's batch comes in two halves: `load` (read,
decode and pad on the CPU; a DataLoader worker may run it ahead) and `finish` (to the device, the live
upstream).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from qspeech import feature_cache
from qspeech.errors import DataError
from qspeech.upstream.model import UpstreamOutput

log = logging.getLogger(__name__)


@dataclass
class SplitStats:
    """How a split's features were made."""

    cache: str  # hit | miss | off (live upstream)
    used: int  # utterances with features (unreadable audio skipped)
    skipped: list[str]  # unreadable audio files
    upstream: tuple[int, float] | None  # (utterances, seconds) of the timed upstream pass; None: not timed
    listed: int  # utterances the split's features are indexed by (live: the unreadable ones too)


def summary(stats: dict[str, SplitStats]) -> dict:
    """TaskMetrics' fields about the features: utterances per split, skipped audio (the eval split's not
    counted), the upstream's throughput and the cache status over all splits."""
    timed = [s.upstream for s in stats.values() if s.upstream]
    n, secs = sum(k for k, _ in timed), sum(t for _, t in timed)
    rate = n / secs if secs else None
    skipped = sorted({p for name, s in stats.items() if name != "eval" for p in s.skipped})
    caches = [s.cache for s in stats.values()]
    return {"upstream_utts_per_s": round(rate, 3) if rate else None, "n_train": stats["train"].used,
            "n_dev": stats["dev"].used, "n_test": stats["test"].used, "skipped_audio": len(skipped),
            "feature_cache": "off" if "off" in caches else ("hit" if all(c == "hit" for c in caches) else "miss")}


def cache_fits(upstream, utts: dict[str, Sequence], trcfg) -> bool:
    """Whether to cache the splits' features: train.cache_features=true, or auto and their estimated size fits
    train.cache_max_gb."""
    est = sum(feature_cache.estimate_bytes(upstream, sum(u.duration_s for u in us)) for us in utts.values())
    use = trcfg.cache_features is True or (trcfg.cache_features == "auto" and est <= trcfg.cache_max_gb * 1e9)
    if trcfg.cache_features == "auto" and not use:
        log.warning("feature cache off: ~%.1f GB of features exceeds train.cache_max_gb=%s", est / 1e9,
                    trcfg.cache_max_gb)
    return use


# ------------------------------------------------------------------------------------- frame-level features
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
        out = self.upstream(wavs, wav_lens)
        frames = out.hidden_states[0].shape[1]
        return UpstreamOutput(out.hidden_states, s3prl_frame_lengths(wav_lens, self.upstream.downsample_rate, frames))


class FeaturePrecision:
    """The upstream run at one precision whatever autocast surrounds it: fp32 (autocast off inside) or bf16
    (autocast on); everything else is the upstream's."""

    def __init__(self, upstream, precision: str):
        self.upstream, self.precision = upstream, precision

    def __getattr__(self, name):
        return getattr(self.upstream, name)

    def __call__(self, wavs: torch.Tensor, wav_lens: torch.Tensor):
        with torch.autocast(wavs.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.upstream(wavs, wav_lens)


def at_precision(upstream, upstream_key: str, precision: str):
    """(the upstream at `precision`, its key): bf16 features are cached under a key of their own."""
    return FeaturePrecision(upstream, precision), upstream_key if precision == "fp32" else f"{upstream_key}|{precision}"


class CachedSource:
    """Hidden states from the on-disk feature cache."""

    def __init__(self, store, utts: Sequence, status: str):
        by_id = {u.utt_id: u for u in utts}
        self.store, self.status = store, status
        self.utts = [by_id[i] for i in store.utt_ids]
        rate = store.meta["downsample_rate"]
        self.lengths_s = [n * rate / 16_000 for n in store.frames]
        self.skipped = list(store.skipped)

    def __len__(self):
        return len(self.utts)

    def load(self, indices):
        feats, lens = self.store.batch(indices, half=True)  # half the bytes to pin and copy; exact in float32
        return feats, lens, list(indices)

    def finish(self, payload, device):
        feats, lens, kept = payload
        return feats.to(device, non_blocking=True).float(), lens, kept

    def batch(self, indices, device):
        return self.finish(self.load(indices), device)

    def stats(self) -> SplitStats:
        rate = self.store.meta.get("upstream_utts_per_s")
        timed = (len(self.store), len(self.store) / rate) if rate else None
        return SplitStats(self.status, len(self), self.skipped, timed, len(self))


class LiveSource:
    """Runs the frozen upstream on every batch (no cache). Unreadable files are skipped with a warning."""

    def __init__(self, upstream, utts: Sequence, read_audio, device):
        self.upstream, self.utts, self.read_audio, self.device = upstream, list(utts), read_audio, device
        self.lengths_s = [u.duration_s for u in self.utts]
        self.skipped: list[str] = []
        self.upstream_s, self.upstream_utts = 0.0, 0

    def __len__(self):
        return len(self.utts)

    def load(self, indices):
        """(padded waveforms, lengths, indices read, [(path, reason)] of the unreadable ones); in a DataLoader
        worker too, so the skips travel back with the batch."""
        wavs, kept, failed = feature_cache.read_waves(self.utts, indices, self.read_audio)
        failed = [(path, str(e)) for path, e in failed]
        return (*feature_cache.pad_waves(wavs), kept, failed) if kept else (None, None, kept, failed)

    def finish(self, payload, device):
        wavs, lens, kept, failed = payload
        for path, why in failed:
            if path not in self.skipped:
                self.skipped.append(path)
                log.warning("skipping unreadable audio %s: %s (%d skipped so far)", path, why, len(self.skipped))
        if not kept:
            return None
        t0 = time.perf_counter()
        feats, lens = feature_cache.forward_padded(self.upstream, wavs, lens, self.device)
        self.upstream_s += time.perf_counter() - t0
        self.upstream_utts += len(kept)
        return feats.to(device), lens, kept

    def batch(self, indices, device):
        return self.finish(self.load(indices), device)

    def stats(self) -> SplitStats:
        return SplitStats("off", len(self) - len(self.skipped), self.skipped, (self.upstream_utts, self.upstream_s),
                          len(self))


def frame_sources(upstream, upstream_key: str, utts: dict, data_fps: dict, read_audio, cache_dir: Path, trcfg,
                  device, progress: bool, s3prl_exact: bool = False) -> dict:
    """Each split's frame features: CachedSource over the feature cache when it fits (cache_fits), else
    LiveSource running the upstream. s3prl_exact: s3prl's frame lengths in every split, and every split but
    train through the upstream one utterance at a time (cached under a key of their own)."""
    upstream, upstream_key = at_precision(upstream, upstream_key, trcfg.feature_precision)
    if s3prl_exact:
        upstream, upstream_key = S3PRLLengths(upstream), f"{upstream_key}|s3prl_exact"
    use_cache = cache_fits(upstream, utts, trcfg)
    sources = {}
    for s in utts:
        if use_cache:
            # batch_s=0: one utterance per upstream call (feature_cache.length_batches)
            batch_s = 0.0 if s3prl_exact and s != "train" else trcfg.feature_batch_s
            store, status = feature_cache.load_or_build(
                upstream, upstream_key, data_fps[s], utts[s], read_audio, cache_dir, device=device,
                batch_s=batch_s, progress=progress, desc=f"upstream {s}")
            sources[s] = CachedSource(store, utts[s], status)
        else:
            sources[s] = LiveSource(upstream, utts[s], read_audio, device)
        if len(sources[s]) == 0:
            raise DataError(f"no readable audio in the {s} split")
    return sources


# ------------------------------------------------------------------------------------- pooled features
def pool_hidden_states(hs: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(B, F, L, D) hidden states and valid frames -> (B, L, D) means over the valid frames."""
    mask = (torch.arange(hs.shape[1])[None, :] < lens[:, None]).to(hs.dtype)[:, :, None, None]
    return (hs * mask).sum(1) / lens.clamp(min=1)[:, None, None].to(hs.dtype)


@dataclass
class Pooled:
    """A split's pooled hidden states: feats[j] (L, D) is utterance utts[kept[j]]'s."""

    feats: torch.Tensor  # (N, L, D)
    kept: list[int]  # indices of the readable utterances, ascending
    stats: SplitStats


def _pooled_cached(store, status: str, utts: Sequence) -> Pooled:
    index = {u.utt_id: i for i, u in enumerate(utts)}
    kept = [index[i] for i in store.utt_ids]
    feats = torch.stack([torch.from_numpy(np.asarray(store.get(k), dtype=np.float32)).mean(0)
                         for k in range(len(store))]) if kept else torch.empty(0)
    rate = store.meta.get("upstream_utts_per_s")
    timed = (len(kept), len(kept) / rate) if rate else None
    return Pooled(feats, kept, SplitStats(status, len(kept), list(store.skipped), timed, len(kept)))


def _pooled_live(upstream, utts: Sequence, read_audio, batch_s: float, device) -> Pooled:
    out, kept, skipped, secs = [], [], [], 0.0
    for batch in feature_cache.length_batches(utts, batch_s):
        wavs, ok, failed = feature_cache.read_waves(utts, batch, read_audio)
        skipped += [p for p, _ in failed]
        if ok:
            t0 = time.perf_counter()
            hs, lens = feature_cache.run_upstream(upstream, wavs, device)
            secs += time.perf_counter() - t0
            out.append(pool_hidden_states(hs.cpu(), lens))
            kept += ok
    order = np.argsort(kept)
    feats = torch.cat(out)[torch.as_tensor(order)] if out else torch.empty(0)
    timed = (len(kept), secs) if secs else None
    return Pooled(feats, sorted(kept), SplitStats("off", len(kept), skipped, timed, len(kept)))


def pooled_splits(upstream, upstream_key: str, utts: dict, data_fps: dict, read_audio: Callable[[str], np.ndarray],
                  cache_dir: Path, trcfg, device, progress: bool) -> dict[str, Pooled]:
    """Each split's hidden states averaged over each utterance's frames, from the feature cache when it fits
    (cache_fits), else from the live upstream."""
    upstream, upstream_key = at_precision(upstream, upstream_key, trcfg.feature_precision)
    use_cache = cache_fits(upstream, utts, trcfg)
    out = {}
    for s, us in utts.items():
        if use_cache:
            store, status = feature_cache.load_or_build(upstream, upstream_key, data_fps[s], us, read_audio,
                                                        cache_dir, device=device, batch_s=trcfg.feature_batch_s,
                                                        progress=progress, desc=f"upstream {s}")
            out[s] = _pooled_cached(store, status, us)
        else:
            out[s] = _pooled_live(upstream, us, read_audio, trcfg.feature_batch_s, device)
        if not out[s].kept:
            raise DataError(f"no readable audio in the {s} split")
    return out
