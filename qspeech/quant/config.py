"""The `quant` config group: schema, validation, supported bits and storage overhead per weight tensor."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from qspeech.errors import ConfigError
from qspeech.quant.targets import check_targets

METHODS = ("rtn", "kmeans", "lsq", "bit")
PTQ_METHODS = ("rtn", "kmeans")
QAT_METHODS = ("lsq", "bit")
GRANULARITIES = ("tensor", "channel", "group")
DISTILL_LOSSES = ("l1_cos", "mse")
CLIPS = ("minmax", "mse")

_WEIGHT_BITS = {
    "rtn": {1, 2, 3, 4, 8, 16},
    "kmeans": {1, 2, 3, 4, 8},
    "lsq": {2, 3, 4, 8},
    "bit": {1, 2},
}
_ACT_BITS = {"rtn": set(), "kmeans": set(), "lsq": {2, 3, 4, 8}, "bit": {1, 2, 3, 4, 8}}
# Config fields that change nothing about the quantized weights (left out of cache keys).
NON_SEMANTIC = ("log_every", "ckpt_every", "progress")


@dataclass
class QuantConfig:
    """Schema of the `quant` config group (conf/quant/<method>.yaml)."""

    method: str = "rtn"
    # Which modules: kinds of qspeech.quant.targets (linear, cnn, pos_conv, proj, heads, all),
    # fnmatch patterns kept in full precision, and {pattern: bits} for mixed precision.
    targets: list = field(default_factory=lambda: ["linear"])
    exclude: list = field(default_factory=list)
    overrides: dict = field(default_factory=dict)
    # Scale sharing: one per tensor, per output channel (row) or per group of `group_size` consecutive
    # input weights of a row (conv weights (out, in, k) are flattened to rows of in*k).
    granularity: str = "channel"
    group_size: int = 128
    # rtn: symmetric narrow range q in [-(2^(b-1)-1), 2^(b-1)-1] (w = q*s), or asymmetric with an
    # integer zero point (w = (q - z)*s, q in [0, 2^b-1]). lsq/bit are always symmetric.
    symmetric: bool = True
    # rtn: 'minmax' range, or 'mse' (per scale group, the clipping ratio minimising the weight error).
    clip: str = "minmax"
    # Activation bits on the inputs of the quantized modules (lsq, bit only); null = full precision.
    act_bits: Any = None
    # kmeans
    iters: int = 30
    seed: int = 0
    # QAT (lsq, bit): layer-wise distillation of hidden states from a full-precision teacher.
    steps: int = 200
    lr: float = 5.0e-4
    batch_size: int = 2
    max_seconds: float = 1.5  # random crop of each training utterance (seconds)
    distill_loss: str = "l1_cos"
    cos_weight: float = 1.0  # weight of the -log sigmoid(cos) term of l1_cos
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # bit at 1 bit: distil FP -> 2-bit -> 1-bit, each stage's teacher being the previous model.
    multi_distill: bool = True
    log_every: int = 25
    ckpt_every: int = 100
    progress: bool = True


def as_quant_config(cfg) -> QuantConfig:
    """QuantConfig from a QuantConfig, an omegaconf DictConfig or a mapping (unknown keys: ConfigError)."""
    if isinstance(cfg, QuantConfig):
        return cfg
    if cfg is None:
        return QuantConfig()
    from qspeech.config import check_keys, plain

    cfg = plain(cfg)
    check_keys(QuantConfig, cfg, "quant")
    out = QuantConfig(**cfg)
    out.targets = list(out.targets or [])
    out.exclude = list(out.exclude or [])
    out.overrides = dict(out.overrides or {})
    return out


def supported_bits(method: str) -> set[int]:
    """Weight bits a method implements (32 = full precision is always allowed besides these)."""
    if method not in METHODS:
        raise ConfigError(f"quant.method: unknown method '{method}'; choose from {list(METHODS)}")
    return set(_WEIGHT_BITS[method])


def supported_act_bits(method: str) -> set[int]:
    supported_bits(method)
    return set(_ACT_BITS[method])


def _check_bits(method: str, bits, what: str) -> int:
    try:
        b = int(bits)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: '{bits}' is not an integer number of bits") from None
    if b != bits:
        raise ConfigError(f"{what}: '{bits}' is not an integer number of bits")
    if b != 32 and b not in _WEIGHT_BITS[method]:
        raise ConfigError(
            f"{what}={b} is not supported by quant.method={method}; choose from {sorted(_WEIGHT_BITS[method])} or 32"
        )
    return b


def validate_quant_config(cfg, bits: int, model=None) -> QuantConfig:
    """Check the quant config for `bits` (and, given the model, group sizes); returns it as QuantConfig."""
    cfg = as_quant_config(cfg)
    supported_bits(cfg.method)
    bits = _check_bits(cfg.method, bits, "bits")
    check_targets(cfg.targets)
    if cfg.granularity not in GRANULARITIES:
        raise ConfigError(f"quant.granularity: unknown '{cfg.granularity}'; choose from {list(GRANULARITIES)}")
    if cfg.method == "kmeans" and cfg.granularity == "group":
        raise ConfigError("quant.granularity=group is not supported by kmeans; use tensor or channel")
    if not isinstance(cfg.group_size, int) or cfg.group_size < 1:
        raise ConfigError(f"quant.group_size must be a positive integer, got {cfg.group_size}")
    if cfg.clip not in CLIPS:
        raise ConfigError(f"quant.clip: unknown '{cfg.clip}'; choose from {list(CLIPS)}")
    if cfg.clip != "minmax" and cfg.method != "rtn":
        raise ConfigError(f"quant.clip={cfg.clip} applies to rtn only; set quant.clip=minmax for {cfg.method}")
    if not cfg.symmetric and cfg.method in ("lsq", "bit"):
        raise ConfigError(f"quant.method={cfg.method} is symmetric only; set quant.symmetric=true")
    if cfg.act_bits is not None:
        allowed = _ACT_BITS[cfg.method]
        if not allowed:
            raise ConfigError(
                f"quant.act_bits is not supported by quant.method={cfg.method} (weight-only); "
                "use lsq or bit, or set quant.act_bits=null"
            )
        if cfg.act_bits not in allowed:
            raise ConfigError(f"quant.act_bits={cfg.act_bits} is not supported by {cfg.method}; choose from {sorted(allowed)}")
    for pattern, ob in cfg.overrides.items():
        _check_bits(cfg.method, ob, f"quant.overrides['{pattern}']")
    if cfg.distill_loss not in DISTILL_LOSSES:
        raise ConfigError(f"quant.distill_loss: unknown '{cfg.distill_loss}'; choose from {list(DISTILL_LOSSES)}")
    if int(cfg.steps) < 0 or int(cfg.batch_size) < 1 or float(cfg.lr) <= 0 or float(cfg.max_seconds) <= 0:
        raise ConfigError("quant: steps must be >= 0, batch_size >= 1, lr > 0 and max_seconds > 0")
    if int(cfg.iters) < 1:
        raise ConfigError("quant.iters must be >= 1")
    if model is not None and bits != 32:
        from qspeech.quant.targets import select_targets

        chosen = select_targets(model, bits, cfg.targets, cfg.exclude, cfg.overrides)
        if cfg.granularity == "group":
            mods = dict(model.named_modules())
            for name in chosen:
                w = mods[name].weight
                row = w[0].numel()
                if row % cfg.group_size:
                    raise ConfigError(
                        f"quant.group_size={cfg.group_size} does not divide the {row} input weights per row of "
                        f"'{name}'; choose a divisor, granularity=channel, or add it to quant.exclude"
                    )
        if cfg.act_bits is not None and getattr(model, "__class__", None).__name__ == "WavLM":
            raise ConfigError("quant.act_bits is not supported for WavLM (its attention bypasses the projections); set quant.act_bits=null")
    return cfg


def n_scale_groups(cfg: QuantConfig, weight_shape: tuple) -> int:
    out = int(weight_shape[0])
    row = int(math.prod(weight_shape[1:]))
    if cfg.granularity == "tensor":
        return 1
    if cfg.granularity == "channel":
        return out
    return out * max(1, row // cfg.group_size)


def overhead_values(cfg, weight_shape: tuple, bits: int) -> int:
    """16-bit values stored besides the b-bit codes for one weight tensor of this shape.

    rtn: a scale per group (+ a zero point when asymmetric; 1 bit: the mean |w| only); kmeans: a codebook of
    2^b levels per group; lsq: the learned step per group (+1 activation step when act_bits is set);
    bit: mean |W| (1 bit) or the learned step (2 bit) per group (+2: activation alpha, beta when act_bits).
    """
    cfg = as_quant_config(cfg)
    bits = int(bits)
    if bits >= 32:
        return 0
    g = n_scale_groups(cfg, tuple(weight_shape))
    if cfg.method == "rtn":
        return g if (bits == 1 or cfg.symmetric) else 2 * g
    if cfg.method == "kmeans":
        return g * (2**bits)
    if cfg.method == "lsq":
        return g + (1 if cfg.act_bits is not None else 0)
    if cfg.method == "bit":
        return g + (2 if cfg.act_bits is not None else 0)
    raise ConfigError(f"quant.method: unknown method '{cfg.method}'; choose from {list(METHODS)}")


def cache_dict(cfg: QuantConfig) -> dict:
    """The config fields that determine the quantized model (for cache keys)."""
    d = dataclasses.asdict(cfg)
    for k in NON_SEMANTIC:
        d.pop(k, None)
    if cfg.method in PTQ_METHODS:
        for k in ("steps", "lr", "batch_size", "max_seconds", "distill_loss", "cos_weight", "weight_decay",
                  "grad_clip", "multi_distill"):
            d.pop(k, None)
    return d
