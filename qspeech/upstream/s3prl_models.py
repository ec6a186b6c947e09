"""What the architectures built on s3prl's model classes share, without s3prl's hub.

s3prl.hub / s3prl.upstream.*.expert import torchaudio (via s3prl.upstream.utils), which does not load
beside CPU torch, so the architectures import s3prl's model modules directly and re-do the few lines of glue
here: configs merged into s3prl's dataclasses, the hidden states its UpstreamExperts hook, and the base of
the fairseq-style transformers (HuBERT, wav2vec 2.0, WavLM).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qspeech.upstream.registry import Architecture


def dataclass_from(dc, cfg: dict):
    """s3prl.upstream.utils.merge_with_parent: keep only the fields the dataclass knows."""
    names = {f.name for f in dataclasses.fields(dc)}
    return dc(**{k: v for k, v in dict(cfg).items() if k in names})


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


def cnn_layers(model: nn.Module) -> list[tuple[int, int, int]]:
    """(channels, kernel, stride) of each block of s3prl's ConvFeatureExtractionModel (model.feature_extractor)."""
    blocks = model.feature_extractor.conv_layers
    return [(blk[0].out_channels, blk[0].kernel_size[0], blk[0].stride[0]) for blk in blocks]


class S3prlTransformer(Architecture):
    """A fairseq-style s3prl model: a CNN front end, then a transformer encoder whose hidden states are the
    input of every layer plus the encoder's output (13 for Base), taken by extract_features."""

    def hidden_states(self, model, wavs, wav_lens, padding_mask):
        return hidden_states_with_hooks(
            model, lambda: model.extract_features(wavs, padding_mask=padding_mask, mask=False))

    def conv_layers(self, model):
        return cnn_layers(model)

    def hidden_size(self, model):
        return model.encoder.layers[0].self_attn.embed_dim

    def num_hidden(self, model):
        return len(model.encoder.layers) + 1


class ConvertedCheckpoint(S3prlTransformer):
    """s3prl's converted fairseq checkpoint (s3prl convert.py): model_cfg, task_cfg, model_weight. The task
    config says whether the waveform is normalised."""

    checkpoint_format = "converted"
    checkpoint_keys = ("task_cfg", "model_cfg", "model_weight")
    weights_key = "model_weight"

    def build(self, model_cfg: dict, task_cfg: dict, state: dict) -> nn.Module:
        """The model of a converted checkpoint's configs (`state`: the rest of the checkpoint)."""
        raise NotImplementedError

    def build_from_state(self, state):
        model_cfg, task_cfg = dict(state["model_cfg"]), dict(state["task_cfg"])
        model = self.build(model_cfg, task_cfg, state)
        return model, state["model_weight"], bool(task_cfg.get("normalize", False))

    def to_state(self, model, weights, arch_cfg, extra):
        return {
            "task_cfg": extra.get("task_cfg", {"normalize": False, "sample_rate": 16000, "label_rate": 50.0}),
            "model_cfg": dict(arch_cfg),
            "model_weight": weights,
        }
