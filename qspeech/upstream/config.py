"""The `model` config group (conf/model/*.yaml): which upstream, and where its weights come from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qspeech.checks import choice, need
from qspeech.identity import outside
from qspeech.upstream.registry import arch_names

INITS = ("pretrained", "random")


@dataclass
class ModelConfig:
    """An s3prl upstream. The defaults are conf/model/hubert.yaml (HuBERT Base, the paper's upstream); a dict
    default stays empty because composing merges an option's arch_cfg into it (keys cannot be removed)."""

    name: str = "hubert"
    # An architecture of qspeech/upstream/archs/: hubert | wav2vec2 | distiller | wavlm | fbank (log-mel
    # features, no weights) | any other registered one.
    arch: str = "hubert"
    # Checkpoint download (s3prl's converted format).
    url: str | None = "https://huggingface.co/s3prl/converted_ckpts/resolve/main/hubert_base_ls960.pt"
    ckpt: str | None = None  # a local checkpoint in s3prl's format instead of the download
    # pretrained: load weights (ckpt, else asset, else url); random: the architecture with random weights.
    init: str = "pretrained"
    # Opt in to full unpickling (torch.load weights_only=False) only for a checkpoint you trust.
    trust_checkpoint: bool = outside(False)
    asset: str | None = None  # packaged checkpoint, relative to qspeech/assets (used when ckpt is null)
    # Architecture settings (s3prl's model config fields) for init=random; a checkpoint carries its own.
    arch_cfg: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        need(bool(self.name), "name", self.name, "must be a non-empty name")
        choice(self, "arch", arch_names())
        choice(self, "init", INITS)
