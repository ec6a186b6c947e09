"""atomic.build_lock: one builder per cache entry; on a file system without flock the build goes on unlocked
(one warning) instead of failing the run."""

from __future__ import annotations

import errno
import fcntl
import logging
import threading
import time

import pytest

from qspeech.atomic import build_lock


def test_a_second_builder_waits_for_the_first(tmp_path):
    events = []

    def builder(name):
        with build_lock(tmp_path / "entry.lock"):
            events.append(f"{name} in")
            time.sleep(0.3)
            events.append(f"{name} out")

    threads = [threading.Thread(target=builder, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert events == ["a in", "a out", "b in", "b out"]


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_without_flock_the_build_goes_on_unlocked(tmp_path, monkeypatch, caplog, code):
    def no_flock(fd, op):
        raise OSError(code, "flock not supported here")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    ran = []
    with caplog.at_level(logging.WARNING, logger="qspeech.atomic"):
        with build_lock(tmp_path / f"entry{code}.lock"):
            ran.append(True)
    assert ran == [True] and "no file locking at" in caplog.text


def test_other_lock_errors_are_not_hidden(tmp_path, monkeypatch):
    def broken(fd, op):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError):
        with build_lock(tmp_path / "entry.lock"):
            pass
