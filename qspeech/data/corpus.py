"""Utterance lists per split for every data kind, with up-front validation."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qspeech.data.audio import SAMPLE_RATE, audio_info
from qspeech.data.config import SPLITS, DataConfig, check_data_paths, resolve_path
from qspeech.data.mini import corpus_hash, ensure_split, mini_root
from qspeech.data.text import normalize_text
from qspeech.errors import ConfigError, DataError

__all__ = ["Utterance", "DataWarning", "Skip", "load_split", "prepare", "config_fingerprint", "record_skips"]

# Bump when loading/validation/resampling changes what a split yields (invalidates feature caches).
DATA_VERSION = 1
_MANIFEST_COLUMNS = ("utt_id", "audio", "text")
_AUDIO_EXTS = (".flac", ".wav")


class DataWarning(UserWarning):
    """Some utterances of a split were skipped (unreadable/empty audio, empty transcript)."""


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    path: str  # absolute path of the audio file
    text: str  # normalised (normalize_text)
    speaker: str
    duration_s: float | None


@dataclass(frozen=True)
class Skip:
    """An utterance a split left out: kind "audio" (missing, empty, unreadable) or "entry" (empty
    transcript, duplicate id, a manifest row without id or audio)."""

    split: str
    path: str
    reason: str
    kind: str


_SKIP_LOGS: list[list[Skip]] = []


@contextmanager
def record_skips() -> Iterator[list[Skip]]:
    """Collect the Skips of every split loaded inside the block (the runner counts them into result.json:
    the task never sees these files, so it cannot count them itself)."""
    log: list[Skip] = []
    _SKIP_LOGS.append(log)
    try:
        yield log
    finally:
        _SKIP_LOGS.remove(log)


# ----------------------------------------------------------------------------------------- readers
# Each reader returns candidates (utt_id, path, raw text, speaker, duration or None) and problems (path, reason).

def _read_librispeech(root: Path, subsets: list[str]):
    cands, problems = [], []
    for subset in subsets:
        sub = root / subset
        if not sub.is_dir() and (root / "LibriSpeech" / subset).is_dir():
            sub = root / "LibriSpeech" / subset
        if not sub.is_dir():
            raise DataError(f"LibriSpeech subset {subset} not found under {root}: set data.root=/path/to/LibriSpeech "
                            f"(the folder holding {subset}/)")
        trans_files = sorted(sub.glob("*/*/*.trans.txt"))
        if not trans_files:
            raise DataError(f"no <speaker>/<chapter>/*.trans.txt files under {sub}: is it a LibriSpeech folder?")
        for tf in trans_files:
            with open(tf, encoding="utf-8", errors="replace") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    utt_id, _, text = line.partition(" ")
                    path = next((tf.parent / (utt_id + e) for e in _AUDIO_EXTS if (tf.parent / (utt_id + e)).exists()),
                                tf.parent / (utt_id + ".flac"))
                    cands.append((utt_id, str(path), text, tf.parent.parent.name, None))
    return cands, problems


def _read_manifest(tsv: Path):
    try:
        return _parse_manifest(tsv)
    except UnicodeDecodeError:  # transcripts in Latin-1 / cp1252: guessing would change the text scored
        raise DataError(f"manifest {tsv} is not UTF-8 text ({_first_bad_byte(tsv.read_bytes())}): save it as "
                        "UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    except csv.Error as e:
        raise DataError(f"manifest {tsv} is not a readable TSV ({e})") from None
    except OSError as e:
        raise DataError(f"cannot read manifest {tsv}: {e.strerror or type(e).__name__}") from None


def _first_bad_byte(raw: bytes) -> str:
    """'byte 0xe9 on line 3' (the decoder's own offset is relative to the chunk it was reading)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        return f"byte 0x{raw[e.start]:02x} on line {line}"
    return "an invalid byte"


def _parse_manifest(tsv: Path):
    cands, problems = [], []
    with open(tsv, encoding="utf-8-sig", newline="") as f:  # -sig: a byte-order mark (Excel) is not a column
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in _MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"manifest {tsv} lacks column(s) {', '.join(missing)}: the header must be "
                            "utt_id<TAB>audio<TAB>duration_s<TAB>sample_rate<TAB>speaker<TAB>text")
        for i, row in enumerate(reader, start=2):
            utt_id, audio = (row.get("utt_id") or "").strip(), (row.get("audio") or "").strip()
            if not utt_id or not audio:
                problems.append((f"{tsv}:{i}", "row without utt_id or audio", "entry"))
                continue
            path = Path(os.path.expanduser(audio))
            path = path if path.is_absolute() else tsv.parent / path
            try:
                dur = float(row["duration_s"]) if row.get("duration_s") not in (None, "") else None
            except ValueError:
                dur = None
            cands.append((utt_id, os.path.abspath(path), row.get("text") or "", (row.get("speaker") or "").strip()
                          or utt_id, dur))
    return cands, problems


# ----------------------------------------------------------------------------------------- loading

def _sources(cfg: DataConfig, split: str, cache_dir, progress: bool):
    """(description of where the split comes from, candidates, problems)."""
    if cfg.kind == "mini":

        if getattr(cfg.mini, f"n_{split}") == 0:
            raise DataError(f"data={cfg.name} has no {split} split: set data.mini.n_{split} > 0")
        root = ensure_split(cfg, split, cache_dir, progress=progress)
        return str(root / split), *_read_librispeech(root, [split])
    srcs = cfg.split_sources(split)
    if cfg.kind == "librispeech":
        root = resolve_path(cfg.root)
        if not srcs:
            raise DataError(f"data={cfg.name} has no {split} split: set data.splits.{split}=<subset folder name>")
        return f"{root} ({', '.join(srcs)})", *_read_librispeech(root, srcs)
    # manifest
    if not srcs:
        raise DataError(f"data={cfg.name} has no {split} split: set data.splits.{split}=/path/to/manifest.tsv")
    cands, problems = [], []
    for s in srcs:
        c, p = _read_manifest(resolve_path(s))
        cands += c
        problems += p
    return ", ".join(str(resolve_path(s)) for s in srcs), cands, problems


def _stable_key(utt_id: str) -> str:
    return hashlib.sha1(utt_id.encode()).hexdigest()


def _load(cfg: DataConfig, split: str, cache_dir, progress: bool = True):
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    check_data_paths(cfg)
    where, cands, problems = _sources(cfg, split, cache_dir, progress)
    utts: dict[str, Utterance] = {}
    for utt_id, path, raw_text, speaker, dur in cands:
        text = normalize_text(raw_text)
        if utt_id in utts:
            problems.append((path, f"duplicate utt_id {utt_id}", "entry"))
            continue
        if not text and split != "unlabeled":
            problems.append((path, "empty transcript", "entry"))
            continue
        try:
            frames, sr = audio_info(path)
        except DataError as e:
            reason = " ".join(str(e).replace(str(path), "").replace(" : ", ": ").split()).strip(" :")
            problems.append((path, reason, "audio"))
            continue
        utts[utt_id] = Utterance(utt_id=utt_id, path=os.path.abspath(path), text=text, speaker=str(speaker),
                                 duration_s=round(frames / sr, 4))
    skips = [Skip(split, str(p), why, kind) for p, why, kind in problems]
    _check_skips(cfg, split, where, skips, len(utts) + len(skips))
    for log in _SKIP_LOGS:
        log.extend(skips)
    out = sorted(utts.values(), key=lambda u: u.utt_id)
    cap = cfg.max_utts.get(split)
    if cap is not None and cap < len(out):
        # a deterministic subset spread over speakers (not the first speakers in id order)
        keep = {u.utt_id for u in sorted(out, key=lambda u: _stable_key(u.utt_id))[:cap]}
        out = [u for u in out if u.utt_id in keep]
    return cfg, out, problems


def _check_skips(cfg: DataConfig, split: str, where: str, skips: list[Skip], total: int) -> None:
    """Warn about skipped utterances; DataError when none is usable or more than data.max_skipped are not."""
    shown = "; ".join(f"{s.path} ({s.reason})" for s in skips[:3])
    more = f"; and {len(skips) - 3} more" if len(skips) > 3 else ""
    if len(skips) == total:  # total 0 too: an empty manifest or folder
        example = f": e.g. {shown}" if skips else " (it lists no utterances)"
        raise DataError(f"no usable utterances in split {split} of data={cfg.name} from {where}{example}; "
                        "fix or replace the audio/transcripts or point the config elsewhere")
    if not skips:
        return
    if len(skips) > cfg.max_skipped * total:
        raise DataError(f"data={cfg.name} split={split}: {len(skips)} of {total} utterances are unusable, more "
                        f"than data.max_skipped={cfg.max_skipped:g} of the split: {shown}{more}; fix the data or "
                        f"raise data.max_skipped")
    warnings.warn(f"data={cfg.name} split={split}: skipped {len(skips)} of {total} utterances (unreadable/empty "
                  f"audio or empty transcript; counted in result.json): {shown}{more}", DataWarning, stacklevel=4)


def load_split(data_cfg: DataConfig, split: str, cache_dir) -> list[Utterance]:
    """Utterances of `split` ("train" | "dev" | "test" | "unlabeled"), validated, sorted by utt_id, capped by
    data.max_utts.<split>. For kind=mini the corpus is synthesized into <cache_dir>/corpora/ on first use.

    Unusable utterances are skipped with one DataWarning (and reported to record_skips); DataError if none is
    left or more than data.max_skipped of the split.
    """
    return _load(data_cfg, split, cache_dir)[1]


def prepare(cfg: DataConfig, cache_dir, progress: bool = True) -> dict:
    """Build (kind=mini) and validate every split; return a JSON-able summary (for `qspeech data`)."""
    check_data_paths(cfg)
    summary: dict = {"name": cfg.name, "kind": cfg.kind, "root": None, "splits": {}}
    if cfg.kind == "mini":

        summary["root"] = str(mini_root(cfg, cache_dir))
    elif cfg.kind == "librispeech":
        summary["root"] = str(resolve_path(cfg.root))
    for split in SPLITS:
        try:
            _, utts, problems = _load(cfg, split, cache_dir, progress)
        except DataError as e:
            summary["splits"][split] = {"error": str(e)}
            continue
        secs = sum(u.duration_s or 0.0 for u in utts)
        summary["splits"][split] = {
            "n_utts": len(utts), "hours": round(secs / 3600, 4), "n_speakers": len({u.speaker for u in utts}),
            "n_skipped": len(problems), "fingerprint": config_fingerprint(cfg, split),
        }
    if all("error" in v for v in summary["splits"].values()):
        raise DataError(f"data={cfg.name}: no split could be loaded; first problem: {summary['splits']['train']['error']}")
    return summary


def config_fingerprint(cfg: DataConfig, split: str) -> str:
    """Stable hash of everything that determines a split's content (for feature caches)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    payload: dict = {"v": DATA_VERSION, "sr": SAMPLE_RATE, "kind": cfg.kind, "split": split,
                     "max_utts": cfg.max_utts.get(split)}
    if cfg.kind == "mini":

        payload["corpus"] = corpus_hash(cfg)
    elif cfg.kind == "librispeech":
        payload["root"] = str(resolve_path(cfg.root)) if cfg.root else None
        payload["subsets"] = cfg.split_sources(split)
    else:
        srcs = []
        for s in cfg.split_sources(split):
            p = resolve_path(s)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            srcs.append([str(p), digest])
        payload["manifests"] = srcs
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
