"""HuBERT (s3prl's HubertModel) in s3prl's converted checkpoint format."""

from __future__ import annotations

from torch import nn

from qspeech.upstream.registry import register
from qspeech.upstream.s3prl_models import ConvertedCheckpoint, dataclass_from

NUM_CLASSES = 504  # k-means units of HuBERT Base's second iteration; only the unused head sees it


def hubert_model(model_cfg: dict, task_cfg: dict, symbols: list) -> nn.Module:
    # s3prl is imported where used: heavy, and only the commands that build an upstream need it
    from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig

    model_cfg = {"label_rate": 50.0, **model_cfg}
    task = dataclass_from(HubertPretrainingConfig, {"label_rate": 50.0, **task_cfg})
    return HubertModel(dataclass_from(HubertConfig, model_cfg), task, symbols)


@register
class Hubert(ConvertedCheckpoint):
    name = "hubert"
    optional_keys = ("dictionaries_symbols",)  # the label dictionaries (s3prl requires them; we default them)

    def build_random(self, arch_cfg):
        return hubert_model(dict(arch_cfg), {}, [list(range(NUM_CLASSES))]), False

    def build(self, model_cfg, task_cfg, state):
        return hubert_model(model_cfg, task_cfg, state.get("dictionaries_symbols") or [list(range(NUM_CLASSES))])

    def to_state(self, model, weights, arch_cfg, extra):
        state = super().to_state(model, weights, arch_cfg, extra)
        labels = [list(range(model.label_embs_concat.shape[0]))]
        state["dictionaries_symbols"] = extra.get("dictionaries_symbols", labels)
        return state

    def export_cfg(self, arch_cfg):
        return {"label_rate": 50.0, **arch_cfg}  # a required field of s3prl's HubertConfig (hubert_model defaults it)
