"""The `quant` config group: QuantConfig (the fields every method shares), DistillConfig (the fields of the
methods trained by distillation), their checks, and what depends on a method's registered facts: supported bits
and the storage overhead per weight tensor.

Each method's config class (RTNConfig, LSQConfig, ...) is a subclass in qspeech/quant/methods/<name>.py whose
fields are the method's and whose defaults are conf/quant/<name>.yaml: a key a method does not have is refused
by name (Hydra's schema for the YAML, TypeError in Python). `quant_config("rtn", ...)` builds a method's class
by name. Checks that need no model run when the object is made (__post_init__); validate_quant_config adds the
bits and the model-dependent ones (group sizes).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

from qspeech.checks import FieldError, choice, integer, need, number, typed
from qspeech.errors import ConfigError
from qspeech.identity import runtime
from qspeech.quant.registry import get_method
from qspeech.quant.targets import check_targets, select_targets

GRANULARITIES = ("tensor", "channel", "group")
DISTILL_LOSSES = ("l1_cos", "mse")
GRAD_SCALE_N = ("row", "layer")


@dataclass
class QuantConfig:
    """The fields every method shares; a method's own class (quant_config(method)) adds the method's."""

    method: str
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

    def __post_init__(self):
        method = get_method(self.method)
        need(isinstance(self, method.config), "method", self.method,
             f"does not match {type(self).__name__}; use {method.config.__name__} or quant_config({self.method!r})")
        for key in ("targets", "exclude"):
            value = getattr(self, key)
            need(not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"), key, value, "must be a list")
            setattr(self, key, list(value))
        check_targets(self.targets)
        need(isinstance(self.overrides, Mapping), "overrides", self.overrides, "must be a mapping {pattern: bits}")
        self.overrides = dict(self.overrides)
        self.check_fields(method)
        method.check(self)

    def check_fields(self, method) -> None:
        """Ranges and choices, and what the method's registered facts allow (no model needed); a method's
        class extends it for its own fields."""
        m = self.method
        choice(self, "granularity", GRANULARITIES)
        need(self.granularity in method.granularities, "granularity", self.granularity,
             f"is not supported by {m}; use {' or '.join(method.granularities)}")
        integer(self, "group_size", 1)
        choice(self, "symmetric", (True, False))
        need(self.symmetric or not method.symmetric_only, "symmetric", self.symmetric,
             f"is not supported by {m} (symmetric only); set quant.symmetric=true")
        for pattern, ob in self.overrides.items():
            check_bits(m, ob, f"overrides[{pattern!r}]", field=True)


@dataclass
class DistillConfig(QuantConfig):
    """The fields of the methods trained by layer-wise distillation of a full-precision teacher's hidden states
    (lsq, bit, bit_exact)."""

    # Activation bits on the inputs of the quantized modules; null = full precision.
    act_bits: int | None = None
    seed: int = 0
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

    def check_fields(self, method) -> None:
        super().check_fields(method)
        if self.act_bits is not None:
            need(bool(method.act_bits), "act_bits", self.act_bits,
                 f"is not supported by quant.method={self.method} (weight-only); set quant.act_bits=null")
            need(_is_int(self.act_bits) and self.act_bits in method.act_bits, "act_bits", self.act_bits,
                 f"is not supported by {self.method}; choose from {sorted(method.act_bits)} or null")
        integer(self, "seed", 0)
        integer(self, "steps", 0)
        integer(self, "batch_size", 1)
        number(self, "lr", 0, lo_open=True)
        number(self, "max_seconds", 0, lo_open=True)
        choice(self, "distill_loss", DISTILL_LOSSES)
        choice(self, "grad_scale_n", GRAD_SCALE_N)
        for key in ("cos_weight", "weight_decay", "grad_clip"):
            number(self, key, 0)
        integer(self, "log_every", 0)
        integer(self, "ckpt_every", 0)


def act_bits_of(cfg: QuantConfig) -> int | None:
    """The activation bits of the quantized modules' inputs; None for full precision (and for every
    weight-only method, whose config has no act_bits)."""
    return getattr(cfg, "act_bits", None)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def quant_config(method: str = "rtn", **fields) -> QuantConfig:
    """The config of `method` (its own class: defaults = conf/quant/<method>.yaml) with `fields` set; a field
    the method does not have is a TypeError naming it."""
    return get_method(method).config(method=method, **fields)


def as_quant_config(cfg) -> QuantConfig:
    """QuantConfig from a QuantConfig, a mapping (an omegaconf DictConfig is one) or None (rtn's defaults),
    typed and checked like the composed config (unknown keys, wrong types: ConfigError naming the key)."""
    if isinstance(cfg, QuantConfig):
        return cfg
    if cfg is None:
        return quant_config()
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"quant: expected a mapping of settings, got {type(cfg).__name__}")
    return typed(get_method(cfg.get("method", "rtn")).config, cfg, "quant")


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
    if act_bits_of(cfg) is not None and type(model).__name__ == "WavLM":
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
