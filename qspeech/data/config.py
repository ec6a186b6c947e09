"""The `data` config group (conf/data/*.yaml), and the checks of its files that run when the data is loaded."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qspeech.checks import FieldError, integer, need, number, pair, typed
from qspeech.data.espeak import english_accents, voice_variants
from qspeech.errors import ConfigError
from qspeech.identity import outside, runtime

__all__ = ["SPLITS", "KINDS", "DataConfig", "MiniConfig", "data_config", "check_data_paths", "resolve_path"]

SPLITS = ("train", "dev", "test", "unlabeled")
KINDS = ("librispeech", "manifest", "mini")
LIBRISPEECH_SPLITS = {"train": "train-clean-100", "dev": "dev-clean", "test": "test-clean", "unlabeled": None}


def _per_split(value=None) -> dict:
    return {s: value for s in SPLITS}


@dataclass
class MiniConfig:
    """The synthesized (eSpeak NG) LibriSpeech-layout corpus. Counts are utterances / voices per split."""

    n_train: int = 2000
    n_dev: int = 100
    n_test: int = 200
    n_unlabeled: int = 3000
    # Speakers are eSpeak voice+accent combinations, disjoint between train, dev and test.
    train_speakers: int = 80
    dev_speakers: int = 10
    test_speakers: int = 10
    # `unlabeled` uses every train speaker plus this many voices of its own (never dev or test voices).
    unlabeled_speakers: int = 80
    min_words: int = 3
    max_words: int = 8
    # Utterances longer than this (after synthesis) are cut to fewer words.
    max_seconds: float = 4.5
    # Sentences draw their content words from the wordfreq English list's top `vocab_size` words.
    vocab_size: int = 300
    # Per-speaker base speaking rate (eSpeak words per minute) and pitch (0-100) ranges;
    # each utterance jitters around its speaker's base.
    rate: list[float] = field(default_factory=lambda: [140.0, 210.0])
    pitch: list[float] = field(default_factory=lambda: [25.0, 75.0])
    # Background noise SNR range in dB (white noise, per utterance), or null for clean audio.
    noise_snr_db: list[float] | None = field(default_factory=lambda: [30.0, 50.0])
    # Worker processes for the build (null: up to 2, never more than the CPU count). Does not change content.
    workers: int | None = runtime(None)

    def __post_init__(self):
        for k in ("n_train", "n_dev", "n_test", "n_unlabeled", "unlabeled_speakers"):
            integer(self, k, 0)
        for k, n in (("train_speakers", self.n_train), ("dev_speakers", self.n_dev), ("test_speakers", self.n_test)):
            integer(self, k, 1 if n > 0 else 0)
        need(self.n_unlabeled == 0 or self.train_speakers + self.unlabeled_speakers >= 1, "unlabeled_speakers",
             self.unlabeled_speakers, "n_unlabeled > 0 needs unlabeled_speakers >= 1 or train speakers")
        integer(self, "min_words", 1)
        integer(self, "max_words", self.min_words)
        number(self, "max_seconds", 0.5)
        integer(self, "vocab_size", 100)
        pair(self, "rate", 80, 450)
        pair(self, "pitch", 0, 100)
        pair(self, "noise_snr_db", -20, 120, optional=True)
        integer(self, "workers", 1, optional=True)
        # the corpus hash reads these as floats whatever the YAML wrote
        self.max_seconds = float(self.max_seconds)
        self.rate, self.pitch = [float(x) for x in self.rate], [float(x) for x in self.pitch]
        if self.noise_snr_db is not None:
            self.noise_snr_db = [float(x) for x in self.noise_snr_db]
        self._check_voices()

    def _check_voices(self) -> None:

        used = ((self.train_speakers, self.n_train or self.n_unlabeled), (self.dev_speakers, self.n_dev),
                (self.test_speakers, self.n_test), (self.unlabeled_speakers, self.n_unlabeled))
        want = sum(n for n, on in used if on)
        have = len(english_accents()) * len(voice_variants())
        if want > have:
            raise FieldError("", f"asks for {want} speakers but eSpeak NG has {have} English voice combinations: "
                                 "lower data.mini.*_speakers")


@dataclass
class DataConfig:
    """The `data` config group; the defaults are conf/data/mini.yaml (the default option). Each kind reads its
    own keys (mini: `mini`; librispeech: `root`, `splits`; manifest: `manifest`, `splits`) and ignores the
    others, so an experiment's data.mini settings do not stop `data=manifest`."""

    name: str = "mini"
    kind: str = "mini"  # mini | librispeech | manifest
    seed: int = 0
    # librispeech: the folder holding train-clean-100/, dev-clean/, ... (checked when the data is loaded).
    root: str | None = None
    # manifest: one TSV used for every split without its own entry in `splits`.
    manifest: str | None = None
    # librispeech: subset folder name(s) per split (unlabeled: null = the train audio); manifest: TSV path(s)
    # per split. A list concatenates.
    splits: dict[str, Any] = field(default_factory=_per_split)
    # Per-split utterance cap (null = all); a deterministic subset spread over speakers.
    max_utts: dict[str, int | None] = field(default_factory=_per_split)
    mini: MiniConfig = field(default_factory=MiniConfig)
    # Unusable utterances (missing / empty / unreadable audio, empty transcript) are skipped and counted
    # (result.json: metrics.skipped_audio) up to this fraction of a split; above it loading fails (exit 2).
    max_skipped: float = outside(0.05)

    def __post_init__(self):
        need(self.kind in KINDS, "kind", self.kind, f"is unknown; use one of {', '.join(KINDS)}")
        need(bool(self.name), "name", self.name, "must be a non-empty name")
        integer(self, "seed", 0)
        self.splits = _splits_dict(self, "splits", LIBRISPEECH_SPLITS if self.kind == "librispeech" else None)
        for s, v in self.splits.items():
            ok = v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
            need(ok, f"splits.{s}", v, "must be null, a name/path or a list of them")
        number(self, "max_skipped", 0.0, 1.0)
        self.max_skipped = float(self.max_skipped)
        self.max_utts = _splits_dict(self, "max_utts", None)
        for s, v in self.max_utts.items():
            need(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0), f"max_utts.{s}", v,
                 "must be null or an integer >= 0")

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


def _splits_dict(cfg, name: str, defaults) -> dict:
    """cfg.<name> as {split: value} over every split (missing ones from `defaults`); unknown splits: error."""
    value = getattr(cfg, name)
    need(isinstance(value, dict), name, value, f"must map split names ({', '.join(SPLITS)}) to values")
    for k in value:
        need(k in SPLITS, f"{name}.{k}", value[k], f"unknown split; use {', '.join(SPLITS)}")
    base = defaults if isinstance(defaults, dict) else _per_split(defaults)
    return {s: value.get(s, base[s]) for s in SPLITS}


def data_config(data) -> DataConfig:
    """The DataConfig of a mapping (dict, DictConfig, a loaded conf/data YAML), checked as when composed; a
    DataConfig is returned as is."""
    if isinstance(data, DataConfig):
        return data
    kind = data.get("kind") if hasattr(data, "get") else None
    if kind not in KINDS:
        raise ConfigError(f"unknown data.kind={kind}: use one of {', '.join(KINDS)}")
    return typed(DataConfig, data, "data")


def resolve_path(p) -> Path:
    """A config path: absolute as is; relative against the cwd, Hydra's original cwd, then the repo root."""
    path = Path(os.path.expanduser(str(p)))
    if path.is_absolute():
        return path
    bases = [Path.cwd()]
    try:
        from hydra.core.hydra_config import HydraConfig  # only inside a Hydra app

        if HydraConfig.initialized():
            bases.append(Path(HydraConfig.get().runtime.cwd))
    except Exception:
        pass
    bases.append(Path(__file__).resolve().parents[2])  # the checkout holding qspeech/ (and conf/)
    for base in bases:
        if (base / path).exists():
            return (base / path).resolve()
    return (bases[0] / path).resolve()


def check_data_paths(cfg: DataConfig) -> DataConfig:
    """The files a (checked) data config points at exist; ConfigError with one line otherwise. Runs when
    the data is loaded, so that an offline upstream download is reported before a missing data folder."""
    if cfg.kind == "librispeech":
        if cfg.root in (None, ""):
            raise ConfigError("data.root is not set: set data.root=/path/to/LibriSpeech")
        if not resolve_path(cfg.root).is_dir():
            raise ConfigError(f"data.root={cfg.root} is not a folder: set data.root=/path/to/LibriSpeech")
    elif cfg.kind == "manifest":
        if cfg.manifest is None and not any(cfg.splits.values()):
            raise ConfigError("no manifest: set data.manifest=/path/to/manifest.tsv or data.splits.<split>=...")
        for split in SPLITS:
            for src in cfg.split_sources(split):
                if not resolve_path(src).is_file():
                    key = f"data.splits.{split}" if cfg.splits.get(split) is not None else "data.manifest"
                    raise ConfigError(f"{key}: manifest file not found: {src}")
    return cfg
