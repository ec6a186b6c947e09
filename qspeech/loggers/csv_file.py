"""The one writer of metric CSV files: a header row of field names, then one row per record (csv's own quoting
and \r\n line ends). The task's metrics.csv is rewritten whole (atomically), pretraining's loss.csv and
logger=csv's logs/metrics.csv are appended to as training goes (so a killed run keeps what it logged)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from pathlib import Path

from qspeech.atomic import write_text_atomic

__all__ = ["append_csv", "csv_text", "read_csv", "write_csv"]


def csv_text(fields: list[str], rows: Iterable[Mapping], header: bool = True) -> str:
    """The file's text: the header, then `rows` (keys outside `fields` are left out)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: Path, fields: list[str], rows: Iterable[Mapping]) -> None:
    """Replace the file (atomically: a reader sees the old file or the new one)."""
    write_text_atomic(Path(path), csv_text(fields, rows))


def append_csv(path: Path, fields: list[str], rows: Iterable[Mapping]) -> None:
    """Append `rows`, after the header when the file is new or empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        f.write(csv_text(fields, rows, header=new))


def read_csv(path: Path) -> list[dict]:
    """The rows as dicts of strings; [] when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
