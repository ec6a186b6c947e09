"""Schema and validation of the `data` config group (conf/data/*.yaml)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qspeech.errors import ConfigError

__all__ = [
    "SPLITS", "KINDS", "DataConfig", "MiniConfig", "validate_data_config", "as_data_config", "resolve_path",
]

SPLITS = ("train", "dev", "test", "unlabeled")
KINDS = ("librispeech", "manifest", "mini")
LIBRISPEECH_SPLITS = {"train": "train-clean-100", "dev": "dev-clean", "test": "test-clean", "unlabeled": None}


@dataclass
class MiniConfig:
    """The synthesized (eSpeak NG) LibriSpeech-layout corpus. Counts are utterances / voices per split."""

    n_train: int = 2000
    n_dev: int = 200
    n_test: int = 200
    n_unlabeled: int = 3000
    # Speakers are eSpeak voice+accent combinations, disjoint between train, dev and test.
    train_speakers: int = 80
    dev_speakers: int = 10
    test_speakers: int = 10
    # `unlabeled` uses every train speaker plus this many voices of its own (never dev or test voices).
    unlabeled_speakers: int = 80
    min_words: int = 3
    max_words: int = 12
    # Utterances longer than this (after synthesis) are cut to fewer words.
    max_seconds: float = 6.0
    # Sentences draw their content words from the wordfreq English list's top `vocab_size` words.
    vocab_size: int = 20000
    # Per-speaker base speaking rate (eSpeak words per minute) and pitch (0-100) ranges;
    # each utterance jitters around its speaker's base.
    rate: list = field(default_factory=lambda: [140, 210])
    pitch: list = field(default_factory=lambda: [25, 75])
    # Background noise SNR range in dB (white noise, per utterance), or null for clean audio.
    noise_snr_db: Any = field(default_factory=lambda: [30.0, 50.0])
    # Worker processes for the build (null: up to 2, never more than the CPU count). Does not change content.
    workers: Any = None


@dataclass
class DataConfig:
    name: str = "mini"
    kind: str = "mini"
    seed: int = 0
    # librispeech: the folder holding train-clean-100/, dev-clean/, ...
    root: Any = None
    # manifest: one TSV used for every split without its own entry in `splits`.
    manifest: Any = None
    # librispeech: subset folder name(s) per split; manifest: TSV path(s) per split. A list concatenates.
    splits: dict = field(default_factory=dict)
    # Per-split utterance cap (null = all); a deterministic subset spread over speakers.
    max_utts: dict = field(default_factory=dict)
    mini: MiniConfig = field(default_factory=MiniConfig)

    def split_sources(self, split: str) -> list[str]:
        """The subset names (librispeech) or manifest paths (manifest) of `split`; [] if it has none."""
        value = self.splits.get(split)
        if value is None and self.kind == "manifest":
            value = self.manifest
        if value is None and self.kind == "librispeech" and split == "unlabeled":
            value = self.splits.get("train")  # unlabeled = the train audio
        if value is None:
            return []
        return [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]

    def to_dict(self) -> dict:
        return asdict(self)


def _to_container(data_cfg) -> dict:
    from omegaconf import DictConfig

    from qspeech.config import plain

    if isinstance(data_cfg, DataConfig):
        return data_cfg.to_dict()
    if data_cfg is None:
        raise ConfigError("no data config: compose one with data=mini|librispeech|manifest|real_speech")
    if not isinstance(data_cfg, (dict, DictConfig)):
        raise ConfigError(f"data config must be a mapping, got {type(data_cfg).__name__}")
    return plain(data_cfg)


def _per_split(raw: dict, key: str, what: str) -> dict:
    """data.<key>: a mapping from known split names (what: what the values are)."""
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"data.{key} must map split names to {what}, got {value!r}")
    for k in value:
        if k not in SPLITS:
            raise ConfigError(f"unknown split data.{key}.{k}: use {', '.join(SPLITS)}")
    return value


def _int(name: str, v, allow_none: bool = False, minimum: int = 0):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise ConfigError(f"{name}={v!r} must be an integer")
    if v < minimum:
        raise ConfigError(f"{name}={v} must be >= {minimum}")
    return int(v)


def _num(name: str, v, minimum: float | None = None, strictly: bool = False):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{name}={v!r} must be a number")
    if minimum is not None and (v <= minimum if strictly else v < minimum):
        raise ConfigError(f"{name}={v} must be {'>' if strictly else '>='} {minimum}")
    return float(v)


def _range(name: str, v, lo: float, hi: float) -> list[float]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ConfigError(f"{name}={v!r} must be a [low, high] pair")
    a, b = (_num(name, x) for x in v)
    if not (lo <= a <= b <= hi):
        raise ConfigError(f"{name}={list(v)} must satisfy {lo} <= low <= high <= {hi}")
    return [a, b]


def as_data_config(data_cfg) -> DataConfig:
    """Convert the composed `data` group (DictConfig or dict) to a DataConfig; ConfigError on bad values."""
    raw = _to_container(data_cfg)
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"unknown data.kind={kind!r}: use one of {', '.join(KINDS)}")
    known = {f.name for f in fields(DataConfig)}
    cfg = DataConfig(**{k: v for k, v in raw.items() if k in known and k not in ("mini", "splits", "max_utts")})
    cfg.name = str(cfg.name if cfg.name is not None else kind)
    cfg.seed = _int("data.seed", cfg.seed)

    splits = _per_split(raw, "splits", "values")
    if kind == "librispeech":
        splits = {**LIBRISPEECH_SPLITS, **splits}
    cfg.splits = {s: splits.get(s) for s in SPLITS}

    max_utts = _per_split(raw, "max_utts", "counts")
    cfg.max_utts = {s: _int(f"data.max_utts.{s}", max_utts.get(s), allow_none=True) for s in SPLITS}

    mini_raw = raw.get("mini") or {}
    if not isinstance(mini_raw, dict):
        raise ConfigError(f"data.mini must be a mapping, got {mini_raw!r}")
    from qspeech.config import check_keys

    check_keys(MiniConfig, mini_raw, "data.mini")
    m = MiniConfig(**mini_raw)
    for k in ("n_train", "n_dev", "n_test", "n_unlabeled", "unlabeled_speakers"):
        setattr(m, k, _int(f"data.mini.{k}", getattr(m, k)))
    for k, n in (("train_speakers", m.n_train), ("dev_speakers", m.n_dev), ("test_speakers", m.n_test)):
        setattr(m, k, _int(f"data.mini.{k}", getattr(m, k), minimum=1 if n > 0 else 0))
    if m.n_unlabeled > 0 and m.train_speakers + m.unlabeled_speakers < 1:
        raise ConfigError("data.mini.n_unlabeled > 0 needs data.mini.unlabeled_speakers >= 1 or train speakers")
    m.min_words = _int("data.mini.min_words", m.min_words, minimum=1)
    m.max_words = _int("data.mini.max_words", m.max_words, minimum=m.min_words)
    m.max_seconds = _num("data.mini.max_seconds", m.max_seconds, minimum=0.5)
    m.vocab_size = _int("data.mini.vocab_size", m.vocab_size, minimum=100)
    m.rate = _range("data.mini.rate", m.rate, 80, 450)
    m.pitch = _range("data.mini.pitch", m.pitch, 0, 100)
    if m.noise_snr_db is not None:
        m.noise_snr_db = _range("data.mini.noise_snr_db", m.noise_snr_db, -20, 120)
    m.workers = _int("data.mini.workers", m.workers, allow_none=True, minimum=1)
    cfg.mini = m
    return cfg


def resolve_path(p) -> Path:
    """A config path: absolute as is; relative against the cwd, Hydra's original cwd, then the repo root."""
    path = Path(os.path.expanduser(str(p)))
    if path.is_absolute():
        return path
    bases = [Path.cwd()]
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            bases.append(Path(HydraConfig.get().runtime.cwd))
    except Exception:
        pass
    bases.append(Path(__file__).resolve().parents[2])  # the checkout holding qspeech/ (and conf/)
    for base in bases:
        if (base / path).exists():
            return (base / path).resolve()
    return (bases[0] / path).resolve()


def validate_data_config(data_cfg, check_paths: bool = True) -> DataConfig:
    """Check the `data` group; raise ConfigError with one line for bad values. Returns the parsed DataConfig.

    check_paths=False checks values only; the files are checked when the data is loaded. The runner
    validates that way so that an offline upstream download is reported before a missing data folder."""
    cfg = as_data_config(data_cfg)
    if cfg.kind == "librispeech" and check_paths:
        if cfg.root in (None, ""):
            raise ConfigError("data.root is not set: set data.root=/path/to/LibriSpeech")
        root = resolve_path(cfg.root)
        if not root.is_dir():
            raise ConfigError(f"data.root={cfg.root} is not a folder: set data.root=/path/to/LibriSpeech")
    elif cfg.kind == "mini":
        m = cfg.mini
        need = sum(n for n, used in ((m.train_speakers, m.n_train or m.n_unlabeled), (m.dev_speakers, m.n_dev),
                                     (m.test_speakers, m.n_test), (m.unlabeled_speakers, m.n_unlabeled)) if used)
        from qspeech.data.espeak import english_accents, voice_variants

        have = len(english_accents()) * len(voice_variants())
        if need > have:
            raise ConfigError(f"data.mini asks for {need} speakers but eSpeak NG has {have} English voice "
                              "combinations: lower data.mini.*_speakers")
    elif cfg.kind == "manifest" and check_paths:
        if cfg.manifest is None and not any(cfg.splits.values()):
            raise ConfigError("no manifest: set data.manifest=/path/to/manifest.tsv or data.splits.<split>=...")
        for split in SPLITS:
            for src in cfg.split_sources(split):
                if not resolve_path(src).is_file():
                    key = f"data.splits.{split}" if cfg.splits.get(split) is not None else "data.manifest"
                    raise ConfigError(f"{key}: manifest file not found: {src}")
    return cfg
