"""The `quant` config group: QuantConfig (the fields every method shares), its checks, and what depends on a
method's registered facts: supported bits and the storage overhead per weight tensor.

Each method's config class (RTNConfig, ...) is a subclass in qspeech/quant/methods/<name>.py whose defaults
are conf/quant/<name>.yaml; `QuantConfig(method="rtn", ...)` builds that class, so a config made in Python
and one composed from the YAML agree. Checks that need no model run when the object is made
(__post_init__); validate_quant_config adds the bits and the model-dependent ones (group sizes).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

from qspeech.checks import FieldError, choice, integer, need, number, typed
from qspeech.errors import ConfigError
from qspeech.quant.registry import get_method
from qspeech.quant.targets import check_targets, select_targets
from qspeech.identity import identity_dict, runtime

GRANULARITIES = ("tensor", "channel", "group")
DISTILL_LOSSES = ("l1_cos", "mse")
CLIPS = ("minmax", "mse")
# Fields that only QAT (distillation) reads: left out of the cache keys of PTQ methods.
QAT_FIELDS = ("steps", "lr", "batch_size", "max_seconds", "distill_loss", "cos_weight", "weight_decay", "grad_clip",
              "multi_distill", "grad_scale_n")
GRAD_SCALE_N = ("row", "layer")


@dataclass
class QuantConfig:
    """Schema of the `quant` config group; QuantConfig(method=m, ...) is m's config class."""

    method: str = "rtn"
    # Which modules: kinds of qspeech.quant.targets (linear, cnn, pos_conv, proj, heads, all),
    # fnmatch patterns kept in full precision, and {pattern: bits} for mixed precision.
    targets: list[str] = field(default_factory=lambda: ["linear"])
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, int] = field(default_factory=dict)
    # Scale sharing: one per tensor, per output channel (row) or per group of `group_size` consecutive
    # input weights of a row (conv weights (out, in, k) are flattened to rows of in*k).
    granularity: str = "channel"
    group_size: int = 128
    # Symmetric narrow range q in [-(2^(b-1)-1), 2^(b-1)-1] (w = q*s), or (rtn) asymmetric with an integer
    # zero point (w = (q - z)*s, q in [0, 2^b-1]).
    symmetric: bool = True
    # rtn: 'minmax' range, or 'mse' (per scale group, the clipping ratio minimising the weight error).
    clip: str = "minmax"
    # Activation bits on the inputs of the quantized modules (lsq, bit only); null = full precision.
    act_bits: int | None = None
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
    # bit at 1 bit: distil FP -> 2-bit -> 1-bit, each stage's teacher being the previous model; bit_exact with
    # act_bits: 1-bit weights through activation bits 4 -> 2 -> 1 (down to act_bits).
    multi_distill: bool = True
    # N of LSQ's gradient scale g = 1/sqrt(N * Qp) for a weight step (lsq, bit's 2-bit stage): 'row' the
    # weights sharing the step (qspeech's default; the demo's numbers), 'layer' the layer's N_W (the LSQ paper).
    grad_scale_n: str = "row"
    log_every: int = runtime(25)
    ckpt_every: int = runtime(100)

    def __new__(cls, *args, **kwargs):
        if cls is QuantConfig:  # the method's own class, whose defaults are its YAML's
            cls = get_method(kwargs.get("method", args[0] if args else QuantConfig.method)).config
        return super().__new__(cls)

    def __post_init__(self):
        method = get_method(self.method)
        need(isinstance(self, method.config), "method", self.method,
             f"does not match {type(self).__name__}; use {method.config.__name__} or QuantConfig(method=...)")
        for key in ("targets", "exclude"):
            value = getattr(self, key)
            need(not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"), key, value, "must be a list")
            setattr(self, key, list(value))
        check_targets(self.targets)
        need(isinstance(self.overrides, Mapping), "overrides", self.overrides, "must be a mapping {pattern: bits}")
        self.overrides = dict(self.overrides)
        _check_fields(self, method)
        method.check(self)


def _check_fields(cfg: QuantConfig, method) -> None:
    """Ranges and choices, and what the method's registered facts allow (no model needed)."""
    m = cfg.method
    choice(cfg, "granularity", GRANULARITIES)
    need(cfg.granularity in method.granularities, "granularity", cfg.granularity,
         f"is not supported by {m}; use {' or '.join(method.granularities)}")
    integer(cfg, "group_size", 1)
    choice(cfg, "clip", CLIPS)
    need(cfg.clip in method.clips, "clip", cfg.clip, f"is not supported by {m}; set quant.clip=minmax")
    choice(cfg, "symmetric", (True, False))
    need(cfg.symmetric or not method.symmetric_only, "symmetric", cfg.symmetric,
         f"is not supported by {m} (symmetric only); set quant.symmetric=true")
    if cfg.act_bits is not None:
        need(bool(method.act_bits), "act_bits", cfg.act_bits,
             f"is not supported by quant.method={m} (weight-only); use lsq or bit, or set quant.act_bits=null")
        need(_is_int(cfg.act_bits) and cfg.act_bits in method.act_bits, "act_bits", cfg.act_bits,
             f"is not supported by {m}; choose from {sorted(method.act_bits)} or null")
    for pattern, ob in cfg.overrides.items():
        check_bits(m, ob, f"overrides[{pattern!r}]", field=True)
    integer(cfg, "iters", 1)
    integer(cfg, "seed", 0)
    integer(cfg, "steps", 0)
    integer(cfg, "batch_size", 1)
    number(cfg, "lr", 0, lo_open=True)
    number(cfg, "max_seconds", 0, lo_open=True)
    choice(cfg, "distill_loss", DISTILL_LOSSES)
    choice(cfg, "grad_scale_n", GRAD_SCALE_N)
    for key in ("cos_weight", "weight_decay", "grad_clip"):
        number(cfg, key, 0)
    integer(cfg, "log_every", 0)
    integer(cfg, "ckpt_every", 0)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def as_quant_config(cfg) -> QuantConfig:
    """QuantConfig from a QuantConfig, a mapping (an omegaconf DictConfig is one) or None (rtn's defaults),
    typed and checked like the composed config (unknown keys, wrong types: ConfigError naming the key)."""
    if isinstance(cfg, QuantConfig):
        return cfg
    if cfg is None:
        return QuantConfig()
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"quant: expected a mapping of settings, got {type(cfg).__name__}")
    return typed(get_method(cfg.get("method", QuantConfig.method)).config, cfg, "quant")


def supported_bits(method: str) -> set[int]:
    """Weight bits a method implements (32 = full precision is always allowed besides these)."""
    return set(get_method(method).weight_bits)


def supported_act_bits(method: str) -> set[int]:
    return set(get_method(method).act_bits)


def check_bits(method: str, bits, what: str = "bits", field: bool = False) -> int:
    """`bits` as an int when `method` implements it (or it is 32), else ConfigError naming `what` (a field of
    QuantConfig when `field`)."""
    allowed = get_method(method).weight_bits
    if isinstance(bits, bool) or not isinstance(bits, numbers.Real) or not float(bits).is_integer():
        why = "is not an integer number of bits"
    elif int(bits) != 32 and int(bits) not in allowed:
        why = f"is not supported by quant.method={method}; choose from {sorted(allowed)} or 32"
    else:
        return int(bits)
    if field:
        raise FieldError(what, why, bits)
    raise ConfigError(f"{what}={bits} {why}")


def validate_quant_config(cfg, bits: int, model=None) -> QuantConfig:
    """The config as QuantConfig, checked for `bits` and, given the (s3prl) model, for its modules: group
    sizes must divide the rows of the quantized weights, WavLM has no input quantization."""
    cfg = as_quant_config(cfg)
    bits = check_bits(cfg.method, bits)
    if model is None or bits == 32:
        return cfg
    chosen = select_targets(model, bits, cfg.targets, cfg.exclude, cfg.overrides)
    if cfg.granularity == "group":
        mods = dict(model.named_modules())
        for name in chosen:
            row = mods[name].weight[0].numel()
            if row % cfg.group_size:
                raise ConfigError(
                    f"quant.group_size={cfg.group_size} does not divide the {row} input weights per row of "
                    f"'{name}'; choose a divisor, granularity=channel, or add it to quant.exclude"
                )
    if cfg.act_bits is not None and type(model).__name__ == "WavLM":
        raise ConfigError("quant.act_bits is not supported for WavLM (its attention bypasses the projections); "
                          "set quant.act_bits=null")
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
    """16-bit values stored besides the b-bit codes for one weight tensor of this shape (0 at 32 bits);
    what they are is the method's (QuantMethod.scale_values)."""
    cfg = as_quant_config(cfg)
    if int(bits) >= 32:
        return 0
    shape = tuple(weight_shape)
    return get_method(cfg.method).overhead(cfg, shape, n_scale_groups(cfg, shape), int(bits))


def key_dict(cfg: QuantConfig) -> dict:
    """The config's result fields (qspeech.identity) as a dict, for run and cache keys."""
    return identity_dict(cfg)


def cache_dict(cfg: QuantConfig) -> dict:
    """The config fields that determine the quantized model (for cache keys)."""
    d = key_dict(cfg)
    if not get_method(cfg.method).needs_distillation:
        for k in QAT_FIELDS:
            d.pop(k, None)
    return d
