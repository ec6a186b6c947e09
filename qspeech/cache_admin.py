"""`qspeech cache list | prune`: what the shared cache (QSPEECH_CACHE) holds, by kind, size and last use, and
removing entries by age or down to a size budget.

At full scale the cache is the study's largest cost (HuBERT Base's 13 x 768 fp16 hidden states are ~362 GB for
train-clean-100, one cache per bits/method variant), and nothing else ever removes an entry. An entry is one
unit that a run rebuilds on its own when it is missing: a feature cache, a distilled student, a head's training
state, a synthesized corpus. Entries that a process is building (their build lock is held) or that changed in
the last `BUSY_S` seconds (a head training right now) are never removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from qspeech.errors import ConfigError

# kind -> the folder under the cache that holds its entries (each entry: one file or one folder in it)
KINDS = {"features": "features", "quant": "quant", "runs": "runs", "corpora": "corpora"}
BUSY_S = 600.0


@dataclass(frozen=True)
class Entry:
    kind: str
    path: Path
    bytes: int
    last_used: float  # newest modification time of anything in it (seconds since the epoch)


def _size_and_mtime(path: Path) -> tuple[int, float]:
    if path.is_file():
        st = path.stat()
        return st.st_size, st.st_mtime
    total, newest = 0, path.stat().st_mtime
    for root, _, files in os.walk(path):
        for f in files:
            try:
                st = os.stat(os.path.join(root, f))
            except FileNotFoundError:  # removed meanwhile (a build publishing its folder)
                continue
            total, newest = total + st.st_size, max(newest, st.st_mtime)
    return total, newest


def entries(cache_dir: str | Path, kinds: list[str] | None = None) -> list[Entry]:
    """Every entry of the given kinds (all by default), oldest first. Locks and unfinished builds
    (`.tmp-*`) are not entries."""
    out = []
    for kind in kinds or list(KINDS):
        folder = Path(cache_dir) / KINDS[kind]
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".tmp-") or p.suffix == ".lock":
                continue
            size, mtime = _size_and_mtime(p)
            out.append(Entry(kind, p, size, mtime))
    return sorted(out, key=lambda e: (e.last_used, str(e.path)))


def _remove(entry: Entry, now: float) -> bool:
    """Remove the entry unless a process is building or using it; True if removed."""
    if now - entry.last_used < BUSY_S:
        return False
    lock = FileLock(str(entry.path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    try:
        if entry.path.is_dir():
            shutil.rmtree(entry.path)
        else:
            entry.path.unlink(missing_ok=True)
        return True
    finally:
        lock.release()


def prune(cache_dir: str | Path, *, older_than_days: float | None = None, max_gb: float | None = None,
          kinds: list[str] | None = None, dry_run: bool = False, now: float | None = None) -> list[Entry]:
    """Remove entries last used more than `older_than_days` ago, then the least recently used ones until the
    entries of these kinds take at most `max_gb`. Returns what was (dry_run: would be) removed."""
    if older_than_days is None and max_gb is None:
        raise ConfigError("cache prune needs --older-than DAYS or --max-gb GB (or both)")
    now = time.time() if now is None else now
    todo = entries(cache_dir, kinds)
    total = sum(e.bytes for e in todo)
    chosen = []
    for e in todo:  # oldest first
        too_old = older_than_days is not None and now - e.last_used > older_than_days * 86400
        too_big = max_gb is not None and total > max_gb * 1e9
        if not (too_old or too_big):
            continue
        if dry_run or _remove(e, now):
            chosen.append(e)
            total -= e.bytes
    return chosen


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _age(seconds: float) -> str:
    return f"{seconds / 86400:.1f} d" if seconds >= 86400 else f"{seconds / 3600:.1f} h"


def table(found: list[Entry], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"{'kind':<9} {'size':>9} {'last used':>10}  path"]
    lines += [f"{e.kind:<9} {_fmt_bytes(e.bytes):>9} {_age(now - e.last_used):>10}  {e.path}" for e in found]
    by_kind = {k: sum(e.bytes for e in found if e.kind == k) for k in KINDS}
    lines.append("total: " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in by_kind.items() if v)
                 + f" ({_fmt_bytes(sum(by_kind.values()))}, {len(found)} entries)")
    return "\n".join(lines)


def _kinds(value: str) -> list[str]:
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kind {', '.join(bad) or repr(value)}; choose from {', '.join(KINDS)}")
    return kinds


def _parser(on_error) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qspeech cache", description="Show or prune the shared cache.")
    p.error = on_error
    p.add_argument("action", choices=("list", "prune"))
    p.add_argument("--cache-dir", default=os.environ.get("QSPEECH_CACHE", str(Path.home() / ".cache" / "qspeech")),
                   help="the cache (default: $QSPEECH_CACHE or ~/.cache/qspeech)")
    p.add_argument("--kind", type=_kinds, default=None, help=f"comma-separated kinds: {', '.join(KINDS)} (default: all)")
    p.add_argument("--older-than", type=float, default=None, metavar="DAYS", help="prune: last used before this")
    p.add_argument("--max-gb", type=float, default=None, help="prune: least recently used first down to this size")
    p.add_argument("--dry-run", action="store_true", help="prune: only list what would go")
    return p


def main(argv: list[str], on_error=None) -> str:
    """The command's output (a table); ConfigError for bad arguments."""
    def error(message: str):
        raise ConfigError(f"cache: {message}")

    args = _parser(on_error or error).parse_args(argv)
    if not Path(args.cache_dir).is_dir():
        raise ConfigError(f"cache folder {args.cache_dir} does not exist; pass --cache-dir or set QSPEECH_CACHE")
    if args.action == "list":
        return table(entries(args.cache_dir, args.kind))
    for name in ("older_than", "max_gb"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ConfigError(f"cache prune --{name.replace('_', '-')}={value}: must be >= 0")
    gone = prune(args.cache_dir, older_than_days=args.older_than, max_gb=args.max_gb, kinds=args.kind,
                 dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    return f"{verb} {len(gone)} entries, {_fmt_bytes(sum(e.bytes for e in gone))}\n" + (table(gone) if gone else "")
