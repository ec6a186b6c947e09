"""Data layer: utterance lists per split (LibriSpeech layout, TSV manifests, the synthesized mini corpus),
audio reading at 16 kHz and SUPERB transcript normalisation."""

from qspeech.data.audio import SAMPLE_RATE, read_audio
from qspeech.data.config import SPLITS, DataConfig, MiniConfig, check_data_paths, data_config
from qspeech.data.corpus import (
    DataWarning, Skip, Utterance, config_fingerprint, load_split, prepare, record_skips,
)
from qspeech.data.text import normalize_text

__all__ = [
    "SAMPLE_RATE", "SPLITS", "DataConfig", "MiniConfig", "DataWarning", "Skip", "Utterance", "check_data_paths",
    "config_fingerprint", "data_config", "load_split", "normalize_text", "prepare", "read_audio", "record_skips",
]
