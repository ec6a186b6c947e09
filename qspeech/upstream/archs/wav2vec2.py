"""wav2vec 2.0 (s3prl's Wav2Vec2Model) in s3prl's converted checkpoint format."""

from __future__ import annotations

from torch import nn

from qspeech.upstream.registry import register
from qspeech.upstream.s3prl_models import ConvertedCheckpoint, dataclass_from


def wav2vec2_model(model_cfg: dict) -> nn.Module:
    # s3prl is imported where used: heavy, and only the commands that build an upstream need it
    from s3prl.upstream.wav2vec2.wav2vec2_model import Wav2Vec2Config, Wav2Vec2Model

    return Wav2Vec2Model(dataclass_from(Wav2Vec2Config, model_cfg))


@register
class Wav2Vec2(ConvertedCheckpoint):
    name = "wav2vec2"

    def build_random(self, arch_cfg):
        return wav2vec2_model(dict(arch_cfg)), False

    def build(self, model_cfg, task_cfg, state):
        return wav2vec2_model(model_cfg)
