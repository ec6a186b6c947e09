"""Utterance lists per split for every data kind, with up-front validation."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from qspeech.data.audio import SAMPLE_RATE, audio_info
from qspeech.data.config import SPLITS, DataConfig, check_data_paths, resolve_path
from qspeech.data.text import normalize_text
from qspeech.errors import ConfigError, DataError

__all__ = ["Utterance", "DataWarning", "load_split", "prepare", "config_fingerprint"]

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
    cands, problems = [], []
    with open(tsv, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in _MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"manifest {tsv} lacks column(s) {', '.join(missing)}: the header must be "
                            "utt_id<TAB>audio<TAB>duration_s<TAB>sample_rate<TAB>speaker<TAB>text")
        for i, row in enumerate(reader, start=2):
            utt_id, audio = (row.get("utt_id") or "").strip(), (row.get("audio") or "").strip()
            if not utt_id or not audio:
                problems.append((f"{tsv}:{i}", "row without utt_id or audio"))
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
        from qspeech.data.mini import ensure_split

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
            problems.append((path, f"duplicate utt_id {utt_id}"))
            continue
        if not text and split != "unlabeled":
            problems.append((path, "empty transcript"))
            continue
        try:
            frames, sr = audio_info(path)
        except DataError as e:
            reason = " ".join(str(e).replace(str(path), "").replace(" : ", ": ").split()).strip(" :")
            problems.append((path, reason))
            continue
        utts[utt_id] = Utterance(utt_id=utt_id, path=os.path.abspath(path), text=text, speaker=str(speaker),
                                 duration_s=round(frames / sr, 4))
    total = len(utts) + len(problems)
    if problems:
        shown = "; ".join(f"{p} ({why})" for p, why in problems[:3])
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        warnings.warn(f"data={cfg.name} split={split}: skipped {len(problems)} of {total} utterances "
                      f"(unreadable/empty audio or empty transcript): {shown}{more}", DataWarning, stacklevel=3)
    if not utts:
        first = f" e.g. {problems[0][0]} ({problems[0][1]})" if problems else ""
        raise DataError(f"no usable utterances in split {split} of data={cfg.name} from {where}:{first}; "
                        "fix or replace the audio/transcripts or point the config elsewhere")
    out = sorted(utts.values(), key=lambda u: u.utt_id)
    cap = cfg.max_utts.get(split)
    if cap is not None and cap < len(out):
        # a deterministic subset spread over speakers (not the first speakers in id order)
        keep = {u.utt_id for u in sorted(out, key=lambda u: _stable_key(u.utt_id))[:cap]}
        out = [u for u in out if u.utt_id in keep]
    return cfg, out, problems


def load_split(data_cfg: DataConfig, split: str, cache_dir) -> list[Utterance]:
    """Utterances of `split` ("train" | "dev" | "test" | "unlabeled"), validated, sorted by utt_id, capped by
    data.max_utts.<split>. For kind=mini the corpus is synthesized into <cache_dir>/corpora/ on first use.

    Unusable utterances are skipped with one DataWarning; DataError if none is left.
    """
    return _load(data_cfg, split, cache_dir)[1]


def prepare(cfg: DataConfig, cache_dir, progress: bool = True) -> dict:
    """Build (kind=mini) and validate every split; return a JSON-able summary (for `qspeech data`)."""
    check_data_paths(cfg)
    summary: dict = {"name": cfg.name, "kind": cfg.kind, "root": None, "splits": {}}
    if cfg.kind == "mini":
        from qspeech.data.mini import mini_root

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
        from qspeech.data.mini import corpus_hash

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
