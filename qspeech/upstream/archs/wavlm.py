"""WavLM (s3prl's WavLM class) in its checkpoint format: cfg, model."""

from __future__ import annotations

from torch import nn

from qspeech.upstream.registry import register
from qspeech.upstream.s3prl_models import S3prlTransformer

# Architecture defaults for random initialisation, as in the published Base+ checkpoint.
BASE_PLUS = {
    "extractor_mode": "default",
    "relative_position_embedding": True,
    "num_buckets": 320,
    "max_distance": 800,
    "gru_rel_pos": True,
    "normalize": False,
}


def wavlm_model(cfg: dict) -> nn.Module:
    # s3prl is imported where used: heavy, and only the commands that build an upstream need it
    from s3prl.upstream.wavlm.WavLM import WavLM, WavLMConfig

    return WavLM(WavLMConfig(cfg))


@register
class WavLM(S3prlTransformer):
    name = "wavlm"
    checkpoint_format = "wavlm"
    checkpoint_keys = ("cfg", "model")
    weights_key = "model"

    def build_random(self, arch_cfg):
        cfg = self.export_cfg(arch_cfg)
        return wavlm_model(cfg), bool(cfg.get("normalize", False))

    def build_from_state(self, state):
        cfg = dict(state["cfg"])
        return wavlm_model(cfg), state["model"], bool(cfg.get("normalize", False))

    def to_state(self, model, weights, arch_cfg, extra):
        return {"cfg": dict(arch_cfg), "model": weights}

    def export_cfg(self, arch_cfg):
        return {**BASE_PLUS, **arch_cfg}
