"""Upstream models by architecture name (qspeech.upstream.registry): with random weights, from an s3prl
checkpoint state, and back to that state."""

from __future__ import annotations

from typing import Any

from torch import nn

from qspeech.errors import CheckpointError
from qspeech.upstream.registry import get_arch


def build_random(arch: str, arch_cfg: dict) -> tuple[nn.Module, bool]:
    """(model, normalize_waveform) with random weights."""
    return get_arch(arch).build_random(dict(arch_cfg))


def build_from_state(arch: str, state: dict) -> tuple[nn.Module, bool]:
    """(model, normalize_waveform) from an s3prl checkpoint dict whose format was already checked."""
    model, weights, normalize = get_arch(arch).build_from_state(state)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise CheckpointError(
            f"checkpoint weights do not fit the {arch} architecture in its config: {' '.join(lines[:2])[:300]}"
        ) from None
    return model, normalize


def to_state(arch: str, model: nn.Module, arch_cfg: dict[str, Any], extra: dict | None = None) -> dict:
    """The inverse of build_from_state: an s3prl-format checkpoint dict (plain containers + tensors)."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return get_arch(arch).to_state(model, weights, arch_cfg, extra or {})
