"""DistilHuBERT (s3prl's DistillerModel) in its checkpoint format: Config (its `distiller` section),
Distiller. Its hidden states are the CNN projection, each layer's output and each prediction head."""

from __future__ import annotations

import torch
from torch import nn

from qspeech.upstream.registry import Architecture, register
from qspeech.upstream.s3prl_models import cnn_layers


def distiller_model(cfg: dict) -> nn.Module:
    # s3prl is imported where used: heavy, and only the commands that build an upstream need it
    from s3prl.upstream.distiller.model import DistillerConfig, DistillerModel

    return DistillerModel(DistillerConfig(cfg))


@register
class Distiller(Architecture):
    name = "distiller"
    checkpoint_format = "distiller"
    checkpoint_keys = ("Config", "Distiller")
    weights_key = "Distiller"

    def build_random(self, arch_cfg):
        return distiller_model(dict(arch_cfg)), False

    def build_from_state(self, state):
        return distiller_model(dict(state["Config"]["distiller"])), state["Distiller"], False

    def to_state(self, model, weights, arch_cfg, extra):
        return {"Config": {"distiller": dict(arch_cfg)}, "Distiller": weights}

    def hidden_states(self, model, wavs, wav_lens, padding_mask):
        valid = torch.ones_like(wavs) if padding_mask is None else (~padding_mask).float()
        _, feat_final, pred, _, layer_hidden = model(wavs, valid, get_hidden=True)
        states = [feat_final] + list(layer_hidden)
        if pred is not None:
            states += [p for p in pred.transpose(0, 1)]
        return states

    def conv_layers(self, model):
        return cnn_layers(model)

    def hidden_size(self, model):
        return int(model.config.encoder_embed_dim)

    def num_hidden(self, model):
        cfg = model.config
        return 1 + cfg.encoder_layers + (cfg.n_tasks if cfg.out_layer_type != "none" else 0)
