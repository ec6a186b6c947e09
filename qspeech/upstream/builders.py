"""Building s3prl's model classes from a config dict or a checkpoint state, without s3prl's hub.

s3prl.hub / s3prl.upstream.*.expert import torchaudio (via s3prl.upstream.utils), which does not load
beside CPU torch, so we import the model modules directly and re-do the few lines of glue here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from qspeech.errors import CheckpointError


def _dataclass_from(dc, cfg: dict):
    # s3prl.upstream.utils.merge_with_parent: keep only the fields the dataclass knows.
    names = {f.name for f in dataclasses.fields(dc)}
    return dc(**{k: v for k, v in dict(cfg).items() if k in names})


def hubert_model(model_cfg: dict, task_cfg: dict, symbols: list) -> nn.Module:
    from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig

    model_cfg = {"label_rate": 50.0, **model_cfg}
    task = _dataclass_from(HubertPretrainingConfig, {"label_rate": 50.0, **task_cfg})
    return HubertModel(_dataclass_from(HubertConfig, model_cfg), task, symbols)


def _wav2vec2(model_cfg: dict) -> nn.Module:
    from s3prl.upstream.wav2vec2.wav2vec2_model import Wav2Vec2Config, Wav2Vec2Model

    return Wav2Vec2Model(_dataclass_from(Wav2Vec2Config, model_cfg))


def distiller_model(cfg: dict) -> nn.Module:
    from s3prl.upstream.distiller.model import DistillerConfig, DistillerModel

    return DistillerModel(DistillerConfig(cfg))


def _wavlm(cfg: dict) -> nn.Module:
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    return WavLM(WavLMConfig(cfg))


# Architecture defaults for random initialisation, as in the published Base checkpoints.
WAVLM_BASE_PLUS = {
    "extractor_mode": "default",
    "relative_position_embedding": True,
    "num_buckets": 320,
    "max_distance": 800,
    "gru_rel_pos": True,
    "normalize": False,
}
HUBERT_NUM_CLASSES = 504  # k-means units of HuBERT Base's second iteration; only the unused head sees it


def build_random(arch: str, arch_cfg: dict) -> tuple[nn.Module, bool]:
    """(model, normalize_waveform) with random weights."""
    arch_cfg = dict(arch_cfg)
    if arch == "hubert":
        return hubert_model(arch_cfg, {}, [list(range(HUBERT_NUM_CLASSES))]), False
    if arch == "wav2vec2":
        return _wav2vec2(arch_cfg), False
    if arch == "distiller":
        return distiller_model(arch_cfg), False
    if arch == "wavlm":
        cfg = {**WAVLM_BASE_PLUS, **arch_cfg}
        return _wavlm(cfg), bool(cfg.get("normalize", False))
    raise CheckpointError(f"unknown upstream architecture '{arch}'")


def build_from_state(arch: str, state: dict) -> tuple[nn.Module, bool]:
    """(model, normalize_waveform) from an s3prl checkpoint dict whose format was already checked."""
    if arch in ("hubert", "wav2vec2"):
        model_cfg, task_cfg = dict(state["model_cfg"]), dict(state["task_cfg"])
        if arch == "hubert":
            model = hubert_model(model_cfg, task_cfg, state.get("dictionaries_symbols") or [list(range(HUBERT_NUM_CLASSES))])
        else:
            model = _wav2vec2(model_cfg)
        weights = state["model_weight"]
        normalize = bool(task_cfg.get("normalize", False))
    elif arch == "distiller":
        model = distiller_model(dict(state["Config"]["distiller"]))
        weights, normalize = state["Distiller"], False
    elif arch == "wavlm":
        cfg = dict(state["cfg"])
        model = _wavlm(cfg)
        weights, normalize = state["model"], bool(cfg.get("normalize", False))
    else:
        raise CheckpointError(f"unknown upstream architecture '{arch}'")
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
    extra = extra or {}
    if arch in ("hubert", "wav2vec2"):
        state = {
            "task_cfg": extra.get("task_cfg", {"normalize": False, "sample_rate": 16000, "label_rate": 50.0}),
            "model_cfg": dict(arch_cfg),
            "model_weight": weights,
        }
        if arch == "hubert":
            state["dictionaries_symbols"] = extra.get(
                "dictionaries_symbols", [list(range(model.label_embs_concat.shape[0]))]
            )
        return state
    if arch == "distiller":
        return {"Config": {"distiller": dict(arch_cfg)}, "Distiller": weights}
    if arch == "wavlm":
        return {"cfg": dict(arch_cfg), "model": weights}
    raise CheckpointError(f"unknown upstream architecture '{arch}'")


def hidden_states_with_hooks(model: nn.Module, run) -> list[torch.Tensor]:
    """s3prl's UpstreamExpert hooks: the input of every encoder layer, then the encoder's output."""
    states: list[torch.Tensor] = []
    handles = [
        layer.register_forward_pre_hook(lambda _m, args: states.append(args[0].transpose(0, 1)))
        for layer in model.encoder.layers
    ]
    handles.append(model.encoder.register_forward_hook(lambda _m, _a, out: states.append(out[0])))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return states

