"""The upstream architectures by name.

An architecture is one module in qspeech/upstream/archs/ (plus a conf/model/<name>.yaml naming it in
`arch:`) that defines an Architecture subclass decorated with @register. Everything else asks the registry:
ModelConfig's `arch` choices, build_upstream (random weights, or a checkpoint checked against the
architecture's s3prl format), save_checkpoint and the export's s3prl copy (back to the checkpoint state),
Upstream (its hidden states, front end and widths) and the packed file's loader (rebuilding the model).

    from qspeech.upstream.registry import get_arch
    get_arch("wavlm").checkpoint_keys        # ('cfg', 'model')
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from qspeech.errors import CheckpointError

_ARCHS: dict[str, Architecture] = {}


class Architecture:
    """One architecture's facts and hooks. Subclasses set `name` and implement build_random, hidden_states,
    conv_layers, hidden_size and num_hidden; one with weights also sets its checkpoint format (the class
    attributes below) and implements build_from_state and to_state."""

    name: ClassVar[str] = ""
    # Its s3prl checkpoint format: the format's name (shared by architectures that share it), the keys that
    # identify it (each holds a mapping), the key holding the model's state dict, and keys a checkpoint may
    # also carry (kept when the export copies a source checkpoint's entries). No weights (FBANK): None.
    checkpoint_format: ClassVar[str | None] = None
    checkpoint_keys: ClassVar[tuple[str, ...]] = ()
    weights_key: ClassVar[str | None] = None
    optional_keys: ClassVar[tuple[str, ...]] = ()

    @property
    def has_weights(self) -> bool:
        """Whether it has weights (a checkpoint, quantization, an s3prl copy); FBANK has none."""
        return self.weights_key is not None

    def build_random(self, arch_cfg: dict) -> tuple[nn.Module, bool]:
        """(model, normalize_waveform) with random weights from the model config's arch_cfg."""
        raise NotImplementedError

    def build_from_state(self, state: dict) -> tuple[nn.Module, Any, bool]:
        """(model, its weights in `state`, normalize_waveform) from a checkpoint dict whose format was checked
        (the caller loads the weights, so that a mismatch is one error for every architecture)."""
        raise CheckpointError(f"model.arch={self.name} has no weights: it has no checkpoint to load")

    def to_state(self, model: nn.Module, weights: dict, arch_cfg: dict, extra: dict) -> dict:
        """The inverse of build_from_state: its checkpoint dict holding `weights` (plain containers + tensors);
        `extra` may give entries the architecture's config does not (e.g. task_cfg)."""
        raise CheckpointError(f"model.arch={self.name} has no weights: it has no checkpoint to write")

    def export_cfg(self, arch_cfg: dict) -> dict:
        """arch_cfg completed with the defaults build_random added, for a checkpoint written from the
        architecture alone (the export of a randomly initialised upstream)."""
        return dict(arch_cfg)

    def hidden_states(self, model: nn.Module, wavs: torch.Tensor, wav_lens: torch.Tensor,
                      padding_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Every hidden state, each (B, frames, D), of a (B, T) batch with `wav_lens` valid samples;
        padding_mask (B, T) is True on padding, or None for a batch without padding, which must then run by
        a path torch's ONNX exporter can trace (qspeech.bench). Upstream trims them to the shortest."""
        raise NotImplementedError

    def conv_layers(self, model: nn.Module) -> list[tuple[int, int, int]]:
        """(channels, kernel, stride) of each layer of the front end, which fix the number of frames."""
        raise NotImplementedError

    def hidden_size(self, model: nn.Module) -> int:
        raise NotImplementedError

    def num_hidden(self, model: nn.Module) -> int:
        raise NotImplementedError


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: make the architecture available under cls.name (model.arch=<name>)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__}: an Architecture needs a name")
    if cls.weights_key is not None and (cls.checkpoint_format is None or cls.weights_key not in cls.checkpoint_keys):
        raise TypeError(f"{cls.__name__}: weights_key must be one of its checkpoint_keys, with a checkpoint_format")
    _ARCHS[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove an architecture (tests that register a throwaway one)."""
    _ARCHS.pop(name, None)


def arch_names() -> tuple[str, ...]:
    return tuple(_ARCHS)


def get_arch(name: str) -> Architecture:
    try:
        return _ARCHS[name]
    except (KeyError, TypeError):
        raise CheckpointError(f"unknown upstream architecture '{name}'") from None


def checkpoint_formats() -> dict[str, tuple[str, ...]]:
    """Format name -> the keys that identify it, in registration order (for naming what a file looks like)."""
    formats: dict[str, tuple[str, ...]] = {}
    for arch in _ARCHS.values():
        if arch.checkpoint_format is not None:
            formats.setdefault(arch.checkpoint_format, arch.checkpoint_keys)
    return formats


__all__ = ["Architecture", "arch_names", "checkpoint_formats", "get_arch", "register", "unregister"]
