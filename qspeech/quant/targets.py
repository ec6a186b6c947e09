"""Which modules of an upstream get low-bit weights. Shared by the quantizers and the cost accounting,
so storage and runtime always describe the model that was evaluated."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

from torch import nn

from qspeech.errors import ConfigError

# Pretraining-only modules: not run when extracting hidden states (HuBERT/wav2vec 2.0 heads), or
# DistilHuBERT's prediction heads, which its paper leaves out of the 23.49 M it reports.
PRETRAINING_HEADS = ("final_proj", "label_embs_concat", "project_q", "quantizer", "target_glu")
DISTILLER_HEADS = ("output_layer",)

KINDS = ("linear", "cnn", "pos_conv", "proj", "heads")
TARGET_CHOICES = KINDS + ("all",)


def is_excluded_from_accounting(param_or_module_name: str) -> bool:
    return param_or_module_name.split(".")[0] in PRETRAINING_HEADS + DISTILLER_HEADS


def module_kind(name: str, module: nn.Module) -> str | None:
    """The kind of a weight-carrying module, or None for modules that are never quantized."""
    if not isinstance(module, (nn.Linear, nn.Conv1d)):
        return None
    top = name.split(".")[0]
    if top in PRETRAINING_HEADS:
        return None
    if top in DISTILLER_HEADS:
        return "heads"
    if name.startswith("feature_extractor."):
        return "cnn"
    if name.startswith("encoder.pos_conv"):
        return "pos_conv"
    if name.startswith("encoder.layers."):
        return "linear" if isinstance(module, nn.Linear) else None
    if name == "post_extract_proj":
        return "proj"
    return None


def candidate_modules(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """name -> (kind, module) for every module a quantizer could touch."""
    out = {}
    for name, mod in model.named_modules():
        kind = module_kind(name, mod)
        if kind is not None:
            out[name] = (kind, mod)
    return out


def check_targets(targets: Iterable[str]) -> list[str]:
    targets = list(targets)
    bad = [t for t in targets if t not in TARGET_CHOICES]
    if bad:
        raise ConfigError(f"quant.targets: unknown kind(s) {bad}; choose from {list(TARGET_CHOICES)}")
    return targets


def select_targets(
    model: nn.Module,
    bits: int,
    targets: Iterable[str] = ("linear",),
    exclude: Iterable[str] = (),
    overrides: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """module name -> weight bits for every module to quantize (absent = kept at full precision).

    targets: kinds to quantize at `bits`; exclude: fnmatch patterns of module names kept in full
    precision; overrides: {pattern: bits} for mixed precision (32 keeps a module in full precision).
    """
    targets = set(check_targets(targets))
    if "all" in targets:
        targets = set(KINDS)
    exclude = list(exclude)
    overrides = dict(overrides or {})
    chosen: dict[str, int] = {}
    for name, (kind, _) in candidate_modules(model).items():
        b = bits if kind in targets else 32
        for pattern, ob in overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                b = int(ob)
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            b = 32
        if b < 32:
            chosen[name] = b
    return chosen
