"""The way back to s3prl (`upstream.s3prl.pt`, written beside the packed file): the same model with its
quantized weights dequantized to fp32, in s3prl's own checkpoint format for its class (the configs of the
checkpoint it came from, else its architecture's: qspeech.upstream.archs), loadable by `model.ckpt=` and by
s3prl; its hidden states equal the evaluated model's. Activation quantizers have no s3prl equivalent: such
a model gets no s3prl file, nor does an upstream without weights (FBANK)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from qspeech.atomic import torch_save_atomic
from qspeech.quant import quantized_modules
from qspeech.quant.api import inner_model
from qspeech.quant.modules import ActQuantizer
from qspeech.quant.targets import module_kind
from qspeech.upstream import build_upstream
from qspeech.upstream.builders import to_state
from qspeech.upstream.registry import get_arch

log = logging.getLogger(__name__)

S3PRL_SUFFIX = ".s3prl.pt"
WEIGHT_NORM_DIM = 2  # s3prl builds every pos_conv with nn.utils.weight_norm(name="weight", dim=2)


def s3prl_path(packed_path) -> Path:
    """The s3prl checkpoint beside a packed file: upstream.packed.safetensors -> upstream.s3prl.pt."""
    packed_path = Path(packed_path)
    stem = packed_path.name
    for suffix in (".packed.safetensors", ".safetensors"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return packed_path.with_name(stem + S3PRL_SUFFIX)


def _weight_norm_parts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_g, weight_v) whose weight_norm is exactly `w`: g is the norm torch's weight_norm itself
    computes, so g / ||v|| is exactly 1."""
    _, norms = torch._weight_norm_interface(w, torch.ones(1, 1, w.shape[WEIGHT_NORM_DIM], dtype=w.dtype),
                                            WEIGHT_NORM_DIM)
    g = norms.reshape(1, 1, -1)
    if not torch.equal(torch._weight_norm(w, g, WEIGHT_NORM_DIM), w):  # another torch: exact up to rounding
        g = torch.norm_except_dim(w, 2, WEIGHT_NORM_DIM)
    return g, w.clone()


@torch.no_grad()
def dequantized_weights(upstream) -> dict[str, torch.Tensor]:
    """The evaluated model's state dict under its s3prl class's keys: each quantized weight as the values
    its forward uses (codes x scales, fp32), every other tensor as it is."""
    model = inner_model(upstream)
    weights = {k: t.detach().cpu().clone() for k, t in model.state_dict().items() if ".parametrizations." not in k}
    for name, module in quantized_modules(model).items():
        w = module.weight.detach().cpu().float().contiguous()  # the fake-quantized weight its forward uses
        if module_kind(name, module) == "pos_conv":  # quantizing removed its weight_norm; s3prl's class has it
            weights[f"{name}.weight_g"], weights[f"{name}.weight_v"] = _weight_norm_parts(w)
        else:
            weights[f"{name}.weight"] = w
    return weights


def _s3prl_template(upstream) -> dict:
    """The checkpoint's non-weight entries: those of the s3prl file the upstream was loaded from (its
    configs and label dictionaries, read without loading its tensors), else built from the architecture."""
    arch, source = get_arch(upstream.spec.arch), Path(str(upstream.spec.source))
    required = [k for k in arch.checkpoint_keys if k != arch.weights_key]
    if source.is_file() and source.suffix != ".safetensors":
        try:
            state = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
            if all(k in state for k in required):
                return {k: state[k] for k in (*required, *arch.optional_keys) if k in state}
        except Exception as e:  # not an s3prl file after all: rebuild the entries from the architecture
            log.debug("s3prl template from %s failed: %s", source, e)
    extra = {"task_cfg": {"normalize": bool(upstream.normalize), "sample_rate": 16000, "label_rate": 50.0}}
    state = to_state(arch.name, inner_model(upstream), arch.export_cfg(dict(upstream.spec.arch_cfg)), extra)
    return {k: v for k, v in state.items() if k != arch.weights_key}


def export_s3prl(upstream, path) -> Path | None:
    """Write the fake-quantized upstream, dequantized to fp32, as a checkpoint in s3prl's own format for its
    model class (HubertModel, Wav2Vec2Model, DistillerModel, WavLM): loadable by `model.ckpt=` and by s3prl.
    Returns None for an upstream without weights (FBANK), and (with a warning) for one that quantizes
    activations, which s3prl's classes cannot."""
    arch = get_arch(upstream.spec.arch)
    if not arch.has_weights:  # FBANK: nothing for s3prl to load
        return None
    model = inner_model(upstream)
    if any(isinstance(getattr(m, "input_quant", None), ActQuantizer) for m in model.modules()):
        log.warning("export: activation quantization (quant.act_bits) has no s3prl equivalent; "
                    "no s3prl checkpoint written (the packed file keeps it)")
        return None
    state = _s3prl_template(upstream) | {arch.weights_key: dequantized_weights(upstream)}
    return torch_save_atomic(state, path)


def load_s3prl(model_cfg, path):
    """The Upstream of an s3prl checkpoint, as `model.ckpt=path` loads it (weights_only=True), frozen as the
    tasks run it (torch's attention takes another, not bit-identical, kernel while weights require grad)."""
    return build_upstream(dataclasses.replace(model_cfg, ckpt=str(path), init="pretrained")).requires_grad_(False)


__all__ = ["dequantized_weights", "export_s3prl", "load_s3prl", "s3prl_path"]
