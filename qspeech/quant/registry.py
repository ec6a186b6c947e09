"""The quantization methods by name.

A method is one module in qspeech/quant/methods/ (plus conf/quant/<name>.yaml) that defines its config class
(a QuantConfig subclass, or DistillConfig's for a method trained by distillation, with the method's own fields
and the YAML's defaults) and a QuantMethod subclass decorated with @register.
Everything else asks the registry: quantize_ (the weight quantizer), the config checks (bits, granularity,
activation bits), the storage accounting (scale values per tensor), storage rounding (the frozen form), and
the runner (whether the method distils on audio).

    from qspeech.quant.registry import get_method
    get_method("bit").weight_bits        # frozenset({1, 2})
"""

from __future__ import annotations

from typing import ClassVar

from qspeech.errors import ConfigError
from qspeech.quant.formats import FORMATS
from qspeech.quant.modules import ActQuantizer

_METHODS: dict[str, QuantMethod] = {}


class QuantMethod:
    """One method's facts and hooks. Subclasses set the class attributes and implement
    make_weight_quantizer and scale_values; the other hooks have defaults that fit most methods."""

    name: ClassVar[str] = ""
    config: ClassVar[type]  # the method's QuantConfig subclass (defaults = conf/quant/<name>.yaml)
    weight_bits: ClassVar[frozenset[int]] = frozenset()  # weight bits it implements (32 is always allowed too)
    act_bits: ClassVar[frozenset[int]] = frozenset()  # bits for the modules' inputs; empty = weight-only
    elastic_act: ClassVar[bool] = False  # input quantizer: BiT's elastic alpha/beta (True) or LSQ's step
    granularities: ClassVar[tuple[str, ...]] = ("tensor", "channel", "group")
    symmetric_only: ClassVar[bool] = False
    needs_distillation: ClassVar[bool] = False  # QAT: trained by distillation on the task's unlabeled audio
    needs_calibration_audio: ClassVar[bool] = False  # PTQ that looks at activations
    # Code formats its quantizers report (qspeech.quant.formats): they fix how codes are packed (offset) and
    # which tensors the packed file stores beside them (scale, zero_point, codebook).
    formats: ClassVar[tuple[str, ...]] = ()

    @property
    def needs_audio(self) -> bool:
        """The runner loads the training split's audio for this method (below 32 bits)."""
        return self.needs_distillation or self.needs_calibration_audio

    def make_weight_quantizer(self, cfg, w, bits: int):
        """The parametrization (a qspeech.quant.modules.WeightQuantizer) for weight `w` at `bits`."""
        raise NotImplementedError

    def scale_values(self, cfg, groups: int, bits: int) -> int:
        """16-bit values stored besides the b-bit codes for one weight tensor with `groups` scale groups."""
        raise NotImplementedError

    def overhead(self, cfg, weight_shape: tuple, groups: int, bits: int) -> int:
        """16-bit values stored besides the codes of one weight tensor of this shape; scale_values unless the
        count depends on the shape (BiT's per-input-channel activation bias)."""
        return self.scale_values(cfg, groups, bits)

    def make_act_quantizer(self, cfg, name: str, module, bits: int):
        """The input quantizer of quantized module `name` (cfg.act_bits set)."""
        return ActQuantizer(int(bits), elastic=self.elastic_act)

    def check(self, cfg) -> None:
        """Method-specific config checks beyond the declared facts (ConfigError naming the key)."""

    def distill_stages(self, cfg, bits: int) -> list[int]:
        """Bits of each distillation stage (QAT methods); each stage is taught by the previous one."""
        return [int(bits)]

    # A stage's student starts from the previous stage's student (its latent weights), or from the
    # full-precision upstream every time (BiT's released scripts: the student is always the FP checkpoint).
    stage_start: ClassVar[str] = "previous"  # previous | full_precision

    def distill_plan(self, cfg, bits: int) -> list[tuple[int, object]]:
        """(weight bits, the stage's config) of each distillation stage; distill_stages with the run's config
        unless a stage changes more than the weight bits (BiT's chain through activation bits)."""
        return [(b, cfg) for b in self.distill_stages(cfg, bits)]

    def storage_form(self, quantizer, latent):
        """A quantizer with the same codes whose parameters are stored values (buffers the packed file holds
        at fp16), or None when `quantizer` already is one. BiT's 1 bit recomputes its scale from the latent
        weights in every forward; its storage form freezes it."""
        return None


def register(cls: type[QuantMethod]) -> type[QuantMethod]:
    """Class decorator: make the method available under cls.name (and its config class under
    quant_config(cls.name))."""
    if not cls.name or not isinstance(getattr(cls, "config", None), type):
        raise TypeError(f"{cls.__name__}: a QuantMethod needs a name and a config class")
    unknown = set(cls.formats) - set(FORMATS)
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown code format(s) {sorted(unknown)}; add them to qspeech.quant.formats")
    _METHODS[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a method (tests that register a throwaway one)."""
    _METHODS.pop(name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str) -> QuantMethod:
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"quant.method={name}: unknown method; choose from {list(_METHODS)}") from None


def quant_schemas() -> dict[str, type]:
    """method name -> its config class, for the Hydra schema of each conf/quant/<name>.yaml."""
    return {name: m.config for name, m in _METHODS.items()}


__all__ = ["QuantMethod", "get_method", "method_names", "quant_schemas", "register", "unregister"]
