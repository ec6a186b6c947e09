"""Feature cache: hits on a second run, misses on a changed upstream, never serves a partial directory."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from qspeech import feature_cache
from qspeech.feature_cache import cache_key, load_or_build

from test_asr_fixture import read_audio, tiny_upstream, write_corpus


@pytest.fixture(scope="module")
def upstream():
    return tiny_upstream()


@pytest.fixture()
def corpus(tmp_path):
    return write_corpus(tmp_path / "wav", {"train": 4}, seconds=(0.3, 0.5))["train"]


def _build(upstream, utts, cache, key="up-a", reader=read_audio, batch_s=1.0):
    return load_or_build(upstream, key, "data-fp", utts, reader, cache, device=torch.device("cpu"), batch_s=batch_s)


def test_second_run_hits_and_matches_upstream(upstream, corpus, tmp_path):
    store, st = _build(upstream, corpus, tmp_path / "c")
    assert st == "miss" and len(store) == 4 and store.utt_ids == [u.utt_id for u in corpus]
    store2, st2 = _build(upstream, corpus, tmp_path / "c")
    assert st2 == "hit" and store2.path == store.path
    assert store.meta["upstream_utts_per_s"] > 0
    # with one utterance per upstream batch, the cached states are the upstream's on it alone, in fp16
    store, _ = _build(upstream, corpus, tmp_path / "c1", batch_s=0.01)
    wav = read_audio(corpus[0].path)
    with torch.no_grad():
        out = upstream(torch.from_numpy(wav)[None], torch.tensor([len(wav)]))
    ref = torch.stack(out.hidden_states, dim=2)[0, : int(out.lengths[0])]
    got = torch.from_numpy(np.array(store.get(0))).float()
    assert got.shape == ref.shape == (store.frames[0], upstream.num_hidden, upstream.hidden_size)
    assert torch.allclose(got, ref.half().float())
    feats, lens = store2.batch([1, 0])
    assert feats.shape[0] == 2 and lens.tolist() == [store.frames[1], store.frames[0]]


def test_changed_upstream_key_or_utterances_miss(upstream, corpus, tmp_path):
    _build(upstream, corpus, tmp_path / "c")
    assert _build(upstream, corpus, tmp_path / "c", key="up-b")[1] == "miss"
    assert _build(upstream, corpus[:3], tmp_path / "c")[1] == "miss"
    assert cache_key("a", "d", corpus) != cache_key("a", "d2", corpus)


def test_parallel_runs_build_one_cache_once(upstream, corpus, tmp_path, monkeypatch):
    """Two runs that need the same features at once (a parallel sweep over seeds): one builds, one waits."""
    import threading
    import time

    real_build, builds = feature_cache.build, []

    def slow_build(*a, **k):
        builds.append(1)
        time.sleep(0.5)  # the other run asks while this one is building
        return real_build(*a, **k)

    monkeypatch.setattr(feature_cache, "build", slow_build)
    got = []
    threads = [threading.Thread(target=lambda: got.append(_build(upstream, corpus, tmp_path / "c"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and sorted(st for _, st in got) == ["hit", "miss"]
    assert got[0][0].path == got[1][0].path and len(got[0][0]) == len(got[1][0]) == 4


def test_crash_mid_build_leaves_nothing_served(upstream, corpus, tmp_path):
    calls = {"n": 0}

    def flaky(path):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return read_audio(path)

    with pytest.raises(RuntimeError):
        _build(upstream, corpus, tmp_path / "c", reader=flaky)
    root = tmp_path / "c" / "features"
    # neither a final dir nor the temp dir (only the empty lock file that kept parallel runs from building twice)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    assert _build(upstream, corpus, tmp_path / "c")[1] == "miss"


def test_partial_cache_dir_is_not_served(upstream, corpus, tmp_path):
    store, _ = _build(upstream, corpus, tmp_path / "c")
    path = store.path
    # a directory without meta.json (e.g. copied half-way, or written by a crashed older version)
    (path / "meta.json").unlink()
    s2, st = _build(upstream, corpus, tmp_path / "c")
    assert st == "miss" and (path / "meta.json").exists()
    # a truncated shard
    shard = path / "shard_00000.npy"
    shard.write_bytes(shard.read_bytes()[:200])
    s3, st = _build(upstream, corpus, tmp_path / "c")
    assert st == "miss" and len(s3) == 4
    # a stale temp dir of a dead process is cleaned
    stale = path.parent / ".tmp-deadbeef-999999999-abcd"
    stale.mkdir()
    _build(upstream, corpus, tmp_path / "c", key="up-z")
    assert not stale.exists()


def test_unreadable_audio_is_skipped_with_warning(upstream, corpus, tmp_path, caplog):
    bad = corpus[2].path
    with open(bad, "wb") as f:
        f.write(b"not a wav file")
    with caplog.at_level(logging.WARNING, logger="qspeech.feature_cache"):
        store, _ = _build(upstream, corpus, tmp_path / "c")
    assert len(store) == 3 and store.skipped == [bad] and corpus[2].utt_id not in store.utt_ids
    text = caplog.text
    assert os.path.basename(bad) in text and "1 of 4" in text


def test_estimate_bytes(upstream):
    # 10 s at 50 frames/s, 7 states of 256 fp16
    assert feature_cache.estimate_bytes(upstream, 10.0) == 500 * 7 * 256 * 2


def _many_shards(upstream, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache, "SHARD_BYTES", 1)  # one shard per upstream batch
    store, _ = _build(upstream, corpus, tmp_path / "c", batch_s=0.01)  # one utterance per batch
    assert len(store.meta["shard_frames"]) == 4
    return store


def test_few_shards_are_open_at_any_time(upstream, corpus, tmp_path, monkeypatch):
    """At full scale a cache has ~1,300 shards; each mapped one holds a file descriptor."""
    store = _many_shards(upstream, corpus, tmp_path, monkeypatch)
    want = [np.array(store.get(i)) for i in range(4)]
    monkeypatch.setattr(feature_cache, "MAX_OPEN_SHARDS", 2)
    store = feature_cache.FeatureStore.open(store.path)
    assert not store.open_shards  # opening reads headers only
    for i in (0, 1, 2, 3, 1, 0):
        assert np.array_equal(store.get(i), want[i]) and len(store.open_shards) <= 2


def test_an_os_error_while_opening_keeps_the_cache_and_says_one_line(upstream, corpus, tmp_path, monkeypatch):
    """Out of file descriptors for real (the soft limit at the lowest free descriptor): that is not corruption, so
    the cache is neither deleted nor rebuilt."""
    import resource

    from qspeech.errors import StorageError

    store = _many_shards(upstream, corpus, tmp_path, monkeypatch)
    files = sorted(p.name for p in store.path.iterdir())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)  # new descriptors take the lowest free number
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        with pytest.raises(StorageError) as e:
            _build(upstream, corpus, tmp_path / "c", batch_s=0.01)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    msg = str(e.value)
    assert "\n" not in msg and "cannot read the feature cache" in msg and "ulimit -n" in msg and "left in place" in msg
    assert sorted(p.name for p in store.path.iterdir()) == files
    assert _build(upstream, corpus, tmp_path / "c", batch_s=0.01)[1] == "hit"


def test_a_cache_that_cannot_fit_on_the_disk_is_refused_before_building(upstream, corpus, tmp_path, monkeypatch):
    from collections import namedtuple

    from qspeech.errors import StorageError

    kept = _build(upstream, corpus[:2], tmp_path / "c")[0].path  # an earlier cache on the same disk
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(StorageError, match=r"the feature cache needs ~0.0 GB for 0.0 h of audio but .* has 0.0 GB "
                                           r"free; free space \(qspeech cache prune\)"):
        _build(upstream, corpus, tmp_path / "c")
    assert (kept / "meta.json").is_file()
    assert not [p for p in (tmp_path / "c" / "features").iterdir() if p.name.startswith(".tmp-")]
