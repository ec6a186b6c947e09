"""On-disk cache of a frozen upstream's hidden states.

A frozen upstream's hidden states for a dataset depend only on (upstream_key, data content), so they are
computed once and reused across epochs and across runs that differ only downstream.

Layout of `<cache_dir>/features/<key>/`:
    shard_00000.npy ...   fp16 arrays (frames, num_hidden, hidden_size), utterances concatenated on
                          frames; opened memory-mapped
    meta.json             written last: utterance ids, (shard, offset, frames) per utterance, skipped
                          files, shapes, upstream throughput, "complete": true

A cache is built in `<cache_dir>/features/.tmp-<key>-<pid>-<rand>/` and renamed into place when
complete, so a crash never leaves a directory that is served; `<key>.lock` lets one process build a given
cache while parallel runs that need it wait. A directory without a valid meta.json
(or whose shards do not match it) is treated as missing and rebuilt; an error of the file system while
reading it (too many open files, no permission) stops the run with one line and leaves the cache in place.
Before a build, the features' size is checked against the disk's free space.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from qspeech.atomic import build_lock
from qspeech.errors import DataError, StorageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SAMPLE_RATE = 16_000
SHARD_BYTES = 256 << 20


def cache_key(upstream_key: str, data_fingerprint: str, utts: Sequence) -> str:
    """Hash of the upstream, the data config and the exact utterance list (ids, files, durations)."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": FORMAT_VERSION, "upstream": upstream_key, "data": data_fingerprint}).encode())
    for u in utts:
        h.update(f"\n{u.utt_id}\t{u.path}\t{float(u.duration_s):.4f}".encode())
    return h.hexdigest()[:24]


def estimate_bytes(upstream, total_seconds: float) -> int:
    """fp16 bytes of all hidden states for this much audio."""
    frames = total_seconds * SAMPLE_RATE / upstream.downsample_rate
    return int(frames * upstream.num_hidden * upstream.hidden_size * 2)


def pad_waves(wavs) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D waveforms (numpy arrays or tensors) -> zero-padded (B, T) float32 batch and their lengths."""
    lens = torch.tensor([len(w) for w in wavs], dtype=torch.long)
    batch = torch.zeros(len(wavs), int(lens.max()), dtype=torch.float32)
    for i, w in enumerate(wavs):
        batch[i, : len(w)] = torch.as_tensor(np.asarray(w, dtype=np.float32))
    return batch, lens


def read_waves(utts: Sequence, indices, read_audio: Callable[[str], np.ndarray]):
    """(waveforms, indices read, [(path, DataError)] of the unreadable ones) for utts[indices]."""
    wavs, kept, failed = [], [], []
    for i in indices:
        try:
            wavs.append(read_audio(utts[i].path))
            kept.append(i)
        except DataError as e:
            failed.append((str(utts[i].path), e))
    return wavs, kept, failed


def run_upstream(upstream, wavs: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad, run the (frozen) upstream without gradients. Returns (B, F, L, D) float32 and frame lengths."""
    return forward_padded(upstream, *pad_waves(wavs), device)


def forward_padded(upstream, batch: torch.Tensor, lens: torch.Tensor, device: torch.device):
    """run_upstream on a batch pad_waves already made (e.g. in a DataLoader worker)."""
    with torch.no_grad():  # not inference_mode: live features feed the (trained) featurizer
        out = upstream(batch.to(device, non_blocking=True), lens.to(device))
        stacked = torch.stack([h.float() for h in out.hidden_states], dim=2)
    return stacked, out.lengths.cpu()


# Shards memory-mapped at once: each mapping holds a file descriptor, and a full-scale cache has ~1,300 shards
# (train-clean-100 through HuBERT Base), more than a default `ulimit -n` of 1024.
MAX_OPEN_SHARDS = 64


def _shard_header(path: Path) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of a .npy file from its header alone (no mapping, the file closed again); ValueError
    when the file is shorter than its header says (a truncated copy)."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        if os.fstat(f.fileno()).st_size < f.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError(f"{path.name} is truncated")
    return shape, dtype


@dataclass
class FeatureStore:
    """Read side of a complete cache directory. Shards are mapped when first read, at most MAX_OPEN_SHARDS at
    a time (least recently used unmapped first)."""

    path: Path
    meta: dict
    open_shards: OrderedDict = field(default_factory=OrderedDict)

    @classmethod
    def open(cls, path: Path) -> "FeatureStore":
        """Open a cache directory; raises ValueError if it is not complete and consistent (a missing shard
        included), OSError for what the file system refuses (that says nothing about the cache itself)."""
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise ValueError("no meta.json")
        meta = json.loads(meta_path.read_text())
        if not meta.get("complete") or meta.get("version") != FORMAT_VERSION:
            raise ValueError("incomplete or old format")
        for i, n in enumerate(meta["shard_frames"]):
            try:
                shape, dtype = _shard_header(path / f"shard_{i:05d}.npy")
            except FileNotFoundError:
                raise ValueError(f"shard {i} is missing") from None
            if shape != (n, meta["num_hidden"], meta["hidden_size"]) or dtype != np.float16:
                raise ValueError(f"shard {i} has shape {shape} {dtype}")
        for s, off, n in meta["index"]:
            if s >= len(meta["shard_frames"]) or off + n > meta["shard_frames"][s]:
                raise ValueError("index out of range")
        return cls(path, meta)

    def shard(self, i: int) -> np.ndarray:
        arr = self.open_shards.pop(i, None)
        if arr is None:
            arr = np.load(self.path / f"shard_{i:05d}.npy", mmap_mode="r")
            while len(self.open_shards) >= MAX_OPEN_SHARDS:
                self.open_shards.popitem(last=False)  # dropping the last reference unmaps it
        self.open_shards[i] = arr
        return arr

    @property
    def utt_ids(self) -> list[str]:
        return self.meta["utt_ids"]

    @property
    def frames(self) -> list[int]:
        return [n for _, _, n in self.meta["index"]]

    @property
    def skipped(self) -> list[str]:
        return self.meta["skipped"]

    def __len__(self) -> int:
        return len(self.meta["index"])

    def get(self, i: int) -> np.ndarray:
        """(frames, num_hidden, hidden_size) fp16, memory-mapped."""
        s, off, n = self.meta["index"][i]
        return self.shard(s)[off:off + n]

    def batch(self, indices: Sequence[int], half: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-padded (B, F, L, D) float32 (half: float16, as stored) and frame lengths."""
        items = [self.get(i) for i in indices]
        lens = torch.tensor([len(x) for x in items], dtype=torch.long)
        out = np.zeros((len(items), int(lens.max()), self.meta["num_hidden"], self.meta["hidden_size"]), np.float16)
        for b, x in enumerate(items):
            out[b, : len(x)] = x
        feats = torch.from_numpy(out)
        return (feats if half else feats.float()), lens


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_tmp(root: Path) -> None:
    for d in root.glob(".tmp-*"):
        try:
            pid = int(d.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def length_batches(utts: Sequence, batch_s: float) -> list[list[int]]:
    """Indices sorted by duration, packed so that padded audio per batch stays under batch_s."""
    order = sorted(range(len(utts)), key=lambda i: (utts[i].duration_s, utts[i].utt_id))
    batches, cur = [], []
    for i in order:
        longest = utts[i].duration_s  # ascending order: the newest is the longest
        if cur and longest * (len(cur) + 1) > batch_s:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


class _ShardWriter:
    """Collects utterances' features and writes them as shards of about SHARD_BYTES into `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.shard_frames: list[int] = []
        self.index: dict[int, tuple[int, int, int]] = {}  # utterance -> (shard, offset, frames)
        self.pending: dict[int, np.ndarray] = {}
        self.pending_bytes = 0

    def add(self, i: int, feats: np.ndarray) -> None:
        self.pending[i] = feats
        self.pending_bytes += feats.nbytes

    def flush(self, force: bool = False) -> None:
        if not self.pending or (self.pending_bytes < SHARD_BYTES and not force):
            return
        s = len(self.shard_frames)
        np.save(self.folder / f"shard_{s:05d}.npy", np.concatenate(list(self.pending.values()), axis=0))
        off = 0
        for i, arr in self.pending.items():
            self.index[i] = (s, off, len(arr))
            off += len(arr)
        self.shard_frames.append(off)
        self.pending, self.pending_bytes = {}, 0


def _extract(upstream, utts: Sequence, read_audio, writer: _ShardWriter, device, batch_s: float, bar) -> dict:
    """Runs the upstream over `utts` in length batches into `writer`; returns skipped files and timing."""
    skipped: list[str] = []
    up_s, n_up = 0.0, 0
    for b in length_batches(utts, batch_s):
        wavs, ok, failed = read_waves(utts, b, read_audio)
        for path_, e in failed:
            skipped.append(path_)
            log.warning("skipping unreadable audio %s: %s", path_, e)
        if ok:
            t0 = time.perf_counter()
            feats, lens = run_upstream(upstream, wavs, device)
            up_s += time.perf_counter() - t0
            n_up += len(ok)
            feats = feats.to("cpu", torch.float16).numpy()
            for k, i in enumerate(ok):
                writer.add(i, feats[k, : int(lens[k])])
            writer.flush()
        bar.update(len(b))
    writer.flush(force=True)
    if skipped:
        log.warning("%d of %d audio files could not be read and were skipped (first: %s)",
                    len(skipped), len(utts), skipped[0])
    return {"skipped": skipped, "upstream_s": up_s, "upstream_utts_per_s": n_up / up_s if up_s else None}


def build(upstream, utts: Sequence, read_audio: Callable[[str], np.ndarray], path: Path, *,
          device: torch.device, batch_s: float = 60.0, progress: bool = False, desc: str = "features") -> FeatureStore:
    """Extract hidden states for `utts` into `path` (atomically). Unreadable audio is skipped with a warning."""
    path = Path(path)
    root = path.parent
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(root)
    tmp = root / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = _ShardWriter(tmp)
        with tqdm(total=len(utts), desc=desc, disable=not progress, dynamic_ncols=True, leave=False) as bar:
            timing = _extract(upstream, utts, read_audio, writer, device, batch_s, bar)
        kept = sorted(writer.index)  # original utterance order
        meta = {"version": FORMAT_VERSION, "complete": True, "num_hidden": upstream.num_hidden,
                "hidden_size": upstream.hidden_size, "downsample_rate": upstream.downsample_rate,
                "shard_frames": writer.shard_frames, "utt_ids": [utts[i].utt_id for i in kept],
                "index": [list(writer.index[i]) for i in kept], "skipped": timing["skipped"],
                "upstream_s": timing["upstream_s"], "upstream_utts_per_s": timing["upstream_utts_per_s"],
                "created": time.time()}
        return _publish(tmp, path, meta)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, path: Path, meta: dict) -> FeatureStore:
    """Complete the cache built in `tmp` with its meta.json and rename it into place."""
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished the same cache first, or a broken dir is in the way
        try:
            return FeatureStore.open(path)
        except (ValueError, KeyError):
            shutil.rmtree(path, ignore_errors=True)
            os.rename(tmp, path)
    return FeatureStore.open(path)


def _open_if_valid(path: Path) -> FeatureStore | None:
    """The complete cache at `path`, or None after removing an incomplete or corrupt one. An error of the file
    system (too many open files, no permission, an I/O error) says nothing about the cache: one line, and the
    cache stays."""
    if not path.exists():
        return None
    try:
        store = FeatureStore.open(path)
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        log.warning("feature cache %s is incomplete or corrupt (%s); rebuilding it", path, e)
        shutil.rmtree(path, ignore_errors=True)
        return None
    except OSError as e:
        raise StorageError(f"cannot read the feature cache {path}: {e.strerror or e} (errno {e.errno}); it was "
                           f"left in place. {_os_hint(e)}") from None
    with contextlib.suppress(OSError):  # last use, for `qspeech cache list | prune`; a read-only cache is fine
        os.utime(path / "meta.json")
    return store


def _os_hint(e: OSError) -> str:
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return "Raise the open-file limit (ulimit -n 4096) and rerun"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "Make it readable or point QSPEECH_CACHE at a cache you may read"
    return "Fix the file system error and rerun, or set train.cache_features=false"


def check_free_space(upstream, utts: Sequence, root: Path) -> None:
    """StorageError (one line) when the features of `utts` cannot fit on the disk that holds `root`."""
    need = estimate_bytes(upstream, sum(float(u.duration_s) for u in utts))
    free = shutil.disk_usage(root).free
    if need > free:
        hours = sum(float(u.duration_s) for u in utts) / 3600
        raise StorageError(f"the feature cache needs ~{need / 1e9:.1f} GB for {hours:.1f} h of audio but {root} has "
                           f"{free / 1e9:.1f} GB free; free space (qspeech cache prune), point QSPEECH_CACHE at a "
                           f"larger disk, or set train.cache_features=false to compute features live")


def load_or_build(upstream, upstream_key: str, data_fingerprint: str, utts: Sequence,
                  read_audio: Callable[[str], np.ndarray], cache_dir: Path, *, device: torch.device,
                  batch_s: float = 60.0, progress: bool = False, desc: str = "features") -> tuple[FeatureStore, str]:
    """The cached features for these utterances: ('hit' | 'miss'). One process builds a given cache; a
    parallel run that needs the same one (a sweep's seeds or head settings on one upstream) waits for it."""
    path = Path(cache_dir) / "features" / cache_key(upstream_key, data_fingerprint, utts)
    store = _open_if_valid(path)
    if store is not None:
        return store, "hit"
    path.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(str(path) + ".lock"):
        store = _open_if_valid(path)  # built by another process while this one waited
        if store is not None:
            return store, "hit"
        check_free_space(upstream, utts, path.parent)
        store = build(upstream, utts, read_audio, path, device=device, batch_s=batch_s, progress=progress, desc=desc)
    return store, "miss"
