"""Upstream loading: s3prl model classes from a name, a packaged asset, s3prl's cache/URL or a local file.

Each architecture is a module of qspeech/upstream/archs/ (see qspeech.upstream.registry); importing this
package registers them."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

import qspeech.upstream.archs  # noqa: F401 - registers the built-in architectures
from qspeech.atomic import torch_save_atomic
from qspeech.errors import CheckpointError
from qspeech.upstream import builders, checkpoints
from qspeech.upstream.config import ModelConfig
from qspeech.upstream.model import SAMPLE_RATE, Upstream, UpstreamOutput, UpstreamSpec
from qspeech.upstream.registry import get_arch

log = logging.getLogger(__name__)

__all__ = ["ModelConfig", "build_upstream", "save_checkpoint", "fingerprint", "Upstream", "UpstreamOutput",
           "UpstreamSpec", "SAMPLE_RATE"]


def build_upstream(cfg: ModelConfig) -> Upstream:
    """The upstream of the `model` config group: random weights (init=random) or a checkpoint (ckpt, else
    the packaged asset, else the url)."""
    arch_cfg = dict(cfg.arch_cfg)
    arch = get_arch(cfg.arch)
    if cfg.ckpt and (not arch.has_weights or cfg.init == "random"):
        why = f"model={cfg.arch} has no weights" if not arch.has_weights else "model.init=random builds random weights"
        log.warning("model.ckpt=%s is ignored: %s (pass model.init=pretrained to load it)", cfg.ckpt, why)
    if not arch.has_weights:  # FBANK: init, ckpt and asset do not apply
        model, normalize = arch.build_random(arch_cfg)
        return Upstream(model, UpstreamSpec(cfg.name, cfg.arch, arch_cfg, "none", None), normalize)
    if cfg.init == "random":
        model, normalize = builders.build_random(cfg.arch, arch_cfg)
        spec = UpstreamSpec(cfg.name, cfg.arch, arch_cfg, "random", None)
    else:
        path = checkpoints.resolve(cfg.name, cfg.url, cfg.ckpt, cfg.asset)
        if path.suffix == ".safetensors":  # qspeech's packed export, not an s3prl checkpoint
            raise CheckpointError(
                f"model.ckpt={cfg.ckpt} is a safetensors file (qspeech's packed export?); model.ckpt takes s3prl's "
                f"checkpoint format: pass the upstream.s3prl.pt written beside it, or load the packed file in "
                f"Python with qspeech.export.load_packed")
        state = checkpoints.load(path, trust=cfg.trust_checkpoint)
        checkpoints.check_format(state, cfg.arch, path)
        model, normalize = builders.build_from_state(cfg.arch, state)
        spec = UpstreamSpec(cfg.name, cfg.arch, arch_cfg, str(path), checkpoints.file_sha256(path))
    return Upstream(model, spec, normalize)


def save_checkpoint(upstream: Upstream, path: str | Path, extra: dict | None = None) -> Path:
    """Write the upstream in s3prl's checkpoint format for its architecture (loadable by model.ckpt=)."""
    return torch_save_atomic(builders.to_state(upstream.spec.arch, upstream.model, upstream.spec.arch_cfg, extra), path)


def fingerprint(upstream: Upstream, extra: str = "") -> str:
    """A hash of everything that determines the upstream's outputs: architecture, every tensor of its
    state (quantizer parameters included) and `extra` (e.g. the quant config). Keys feature caches."""
    h = hashlib.sha256()
    h.update(json.dumps({"arch": upstream.spec.arch, "cfg": upstream.spec.arch_cfg, "norm": upstream.normalize,
                         "extra": extra}, sort_keys=True, default=str).encode())
    for name, t in sorted(upstream.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
