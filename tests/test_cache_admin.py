"""`qspeech cache list | prune` (qspeech.cache_admin) on a cache laid out as runs leave it."""

import os
import time

import pytest
from filelock import FileLock

from qspeech.cache_admin import entries, main, prune
from qspeech.errors import ConfigError

DAY = 86400.0


def _entry(path, nbytes, age_days, now):
    if path.suffix == ".pt":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * nbytes)
        files = [path]
    else:
        path.mkdir(parents=True)
        (path / "shard_00000.npy").write_bytes(b"x" * nbytes)
        files = [path / "shard_00000.npy", path]
    for f in files:
        os.utime(f, (now - age_days * DAY, now - age_days * DAY))
    return path


@pytest.fixture
def cache(tmp_path):
    now = time.time()
    _entry(tmp_path / "features" / "aaa", 3000, 30, now)
    _entry(tmp_path / "features" / "bbb", 1000, 2, now)
    _entry(tmp_path / "quant" / "tiny_bit_b2_k.pt", 500, 10, now)
    _entry(tmp_path / "runs" / "r1", 200, 1, now)
    (tmp_path / "features" / "aaa.lock").write_text("")  # locks and unfinished builds are not entries
    (tmp_path / "features" / ".tmp-ccc-123-ab").mkdir()
    return tmp_path, now


def test_list_is_oldest_first_with_sizes(cache):
    root, _ = cache
    found = entries(root)
    assert [(e.kind, e.path.name, e.bytes) for e in found] == [
        ("features", "aaa", 3000), ("quant", "tiny_bit_b2_k.pt", 500), ("features", "bbb", 1000), ("runs", "r1", 200)]
    out = main(["list", "--cache-dir", str(root)])
    assert "features" in out and "total: features 4.0 kB, quant 500 B, runs 200 B (4.7 kB, 4 entries)" in out


def test_prune_by_age_and_by_size_least_recently_used_first(cache):
    root, now = cache
    assert [e.path.name for e in prune(root, older_than_days=5, dry_run=True, now=now)] == ["aaa", "tiny_bit_b2_k.pt"]
    assert (root / "features" / "aaa").exists()  # dry run
    gone = prune(root, max_gb=1500 / 1e9, now=now)  # 4700 bytes down to <= 1500: the two oldest go
    assert [e.path.name for e in gone] == ["aaa", "tiny_bit_b2_k.pt"]
    assert not (root / "features" / "aaa").exists() and not (root / "quant" / "tiny_bit_b2_k.pt").exists()
    assert sorted(e.path.name for e in entries(root)) == ["bbb", "r1"]
    gone = prune(root, older_than_days=0, kinds=["runs"], now=now)
    assert [e.path.name for e in gone] == ["r1"] and (root / "features" / "bbb").exists()


def test_entries_in_use_are_kept(cache):
    root, now = cache
    _entry(root / "runs" / "training_now", 100, 0, now)  # changed a moment ago: a head training right now
    with FileLock(str(root / "features" / "aaa") + ".lock"):  # a process building or loading it
        gone = prune(root, older_than_days=0, now=now)
    assert sorted(e.path.name for e in gone) == ["bbb", "r1", "tiny_bit_b2_k.pt"]
    assert (root / "features" / "aaa").exists() and (root / "runs" / "training_now").exists()


@pytest.mark.parametrize("argv, message", [
    (["prune"], "needs --older-than DAYS or --max-gb GB"),
    (["prune", "--max-gb", "-1"], "--max-gb=-1.0: must be >= 0"),
    (["list", "--kind", "nope"], "unknown kind nope"),
    (["drop"], "invalid choice: 'drop'"),
])
def test_bad_arguments_are_one_line(cache, argv, message):
    root, _ = cache
    with pytest.raises(ConfigError, match=message):
        main([*argv, "--cache-dir", str(root)])


def test_missing_cache_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        main(["list", "--cache-dir", str(tmp_path / "nowhere")])


def test_the_cli_lists_and_prunes(cache):
    from conftest import run_cli

    root, _ = cache
    proc = run_cli("cache", "list", "--cache-dir", str(root))
    assert proc.returncode == 0 and "4 entries" in proc.stdout
    proc = run_cli("cache", "prune", "--older-than", "5", env={"QSPEECH_CACHE": str(root)})
    assert proc.returncode == 0 and "removed 2 entries" in proc.stdout
    proc = run_cli("cache", "prune", "--cache-dir", str(root))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "needs --older-than" in proc.stderr
