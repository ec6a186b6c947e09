"""Errors the user can fix. The CLI prints their message as one line and exits with code 2."""


class QSpeechError(Exception):
    """Base class: bad input, missing files, offline downloads. Message = what is wrong + how to fix."""


class ConfigError(QSpeechError):
    """A composed config value is out of range or inconsistent."""


class CheckpointError(QSpeechError):
    """A checkpoint is missing, cannot be downloaded, or is corrupt."""


class DataError(QSpeechError):
    """Audio or transcripts are missing, unreadable or empty."""


class TrainingError(QSpeechError):
    """Training diverged (NaN/inf loss) or cannot continue."""


class StorageError(QSpeechError):
    """A folder cannot be created or written: read-only, a file in the way, no space left."""


class RunLockedError(QSpeechError):
    """Another live qspeech process holds the run folder of the same experiment."""
