"""Atomic file writes: write beside the target, rename over it only when complete, so a crash or a
parallel reader never sees a half-written result, checkpoint or cache file. Also the checks and the lock that
keep file-system faults and concurrent runners from becoming tracebacks or doubled work."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qspeech.errors import RunLockedError, StorageError

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path in the target's folder; it replaces `path` if the block succeeds, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results should be readable like any other
    try:
        yield Path(tmp)
        # again: a writer that recreates the file (safetensors' save_file) makes it 0600 once more
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def torch_save_atomic(obj: Any, path: str | Path) -> Path:
    import torch

    # torch.save names the zip's records after the file's stem: writing <stem>.tmp in a temp folder beside
    # the target keeps the bytes a function of the object alone (rebuilt checkpoints are identical), and no
    # half-written file ever carries the target's name or suffix.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp = tmp_dir / f"{path.stem}.tmp"
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


# ---------------------------------------------------------------- folders that must be writable
def _os_reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _writable(folder: Path) -> bool:
    # access() answers for root too on a read-only mount (EROFS); tests replace it to simulate one
    return os.access(folder, os.W_OK | os.X_OK)


def folder_problem(path: str | Path) -> str | None:
    """Why `path` cannot be used as a writable folder (created if missing), or None. Looks only, creates
    nothing: the nearest existing ancestor must be a folder we may write into."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    for q in (p, *p.parents):
        if not os.path.lexists(q):
            continue
        if not q.is_dir():
            return f"{q} is a file, not a folder"
        if not _writable(q):
            return f"{q} is not writable"
        return None
    return None


def ensure_folder(path: str | Path, what: str, fix: str) -> Path:
    """mkdir -p `path`; StorageError "what path: reason; fix" (one line) if it cannot be created or written."""
    problem = folder_problem(path)
    if problem is None:
        try:
            Path(path).expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as e:
            problem = f"cannot create it ({_os_reason(e)})"
    if problem is not None:
        raise StorageError(f"{what} {path}: {problem}; {fix}")
    return Path(path).expanduser()


def storage_error(e: OSError, what: str) -> StorageError | None:
    """The one-line error for a write that failed because of the file system (full, read-only, no
    permission, a file in the way), or None for other OSErrors (those are bugs and keep their traceback)."""
    codes = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}
    if e.errno not in codes:
        return None
    where = f" ({e.filename})" if e.filename else ""
    return StorageError(f"cannot write {what}{where}: {_os_reason(e)}; free space or choose a writable folder")


# ---------------------------------------------------------------- one runner per folder
LOCK_FILE = ".qspeech.lock"


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode(errors="replace").strip()


def _describe_holder(text: str) -> str:
    """'pid N on HOST since T' from the lock file's 'N HOST T' line (what the refusal names)."""
    parts = text.split()
    return f"pid {parts[0]} on {parts[1]} since {parts[2]}" if len(parts) >= 3 else "another process"


def _try_lock(fd: int, folder) -> bool:
    """flock `fd` exclusively without waiting: True when held, False on a file system without flock (some
    network mounts: the run goes on unlocked, as before the lock existed); RunLockedError when held."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunLockedError(
            f"{folder} is in use by another qspeech run of the same experiment ({_describe_holder(_holder(fd))}); "
            "wait for it to finish, or stop it and rerun the same command to resume") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        return False
    return True


def lock_holder(folder: str | Path) -> tuple[bool, str] | None:
    """Who holds the folder's run lock, without touching the lock (a run starting meanwhile must not be
    refused): (alive, 'pid N on HOST since T') from the holder line, alive when that process still runs on this
    host (on another host it is taken as alive); None when no holder is named (never run, or exited cleanly)."""
    try:
        text = (Path(folder) / LOCK_FILE).read_text(errors="replace").strip()
    except OSError:
        return None
    parts = text.split()
    if len(parts) < 3 or not parts[0].isdigit():
        return None
    alive = parts[1] != socket.gethostname()
    if not alive:
        try:
            os.kill(int(parts[0]), 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
    return alive, _describe_holder(text)


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[str | None]:
    """Hold an exclusive lock on `folder` (its LOCK_FILE) for the block. flock is released by the kernel
    when its holder dies, kill -9 included (unlike a pid check, this holds across hosts and pid reuse), so a
    stale lock is simply taken over; the file's "pid host time" line only names the holder. Yields the stale
    holder's line when one was taken over, else None. RunLockedError if a live process holds it."""
    fd = os.open(Path(folder) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        if not _try_lock(fd, folder):
            yield None
            return
        # the lock was free but the file still names a holder: that process died without releasing it
        stale = _holder(fd) or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
        try:
            yield stale
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves no holder behind; a killed one leaves its line (stale)
    finally:
        os.close(fd)  # releases the flock


# ---------------------------------------------------------------- one builder per cache entry
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


@contextmanager
def build_lock(path: str | Path) -> Iterator[None]:
    """Held while one process builds a cache entry that parallel runs also need (a corpus split, an
    upstream's features, a distilled student): the others wait, then load it instead of building it again.
    On a file system without flock (some network mounts) the build goes on unlocked, as folder_lock does:
    parallel runs may then repeat the work, never corrupt it (entries are published atomically)."""
    from filelock import FileLock

    lock = FileLock(str(path))
    try:
        lock.acquire()
        held = True
    except (NotImplementedError, OSError) as e:  # filelock says "no flock" one way or the other by version
        if isinstance(e, OSError) and e.errno not in _NO_FLOCK:
            raise
        log.warning("no file locking at %s (%s): parallel runs may repeat this work", path, e)
        held = False
    try:
        yield
    finally:
        if held:
            lock.release()
