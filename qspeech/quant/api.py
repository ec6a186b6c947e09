"""quantize_ (in place, torchao style) and access to the quantized modules' parts."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm

from qspeech.quant.config import act_bits_of, as_quant_config, validate_quant_config
from qspeech.quant.formats import dequantize_parts
from qspeech.quant.modules import ActQuantizer, WeightQuantizer, input_quant_hook
from qspeech.quant.registry import get_method
from qspeech.quant.targets import select_targets


def inner_model(model: nn.Module) -> nn.Module:
    """The module whose submodule names select_targets sees: a wrapper's `.model` when it holds one (qspeech's
    Upstream keeps the s3prl model there), else the module itself."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) else model


def make_weight_quantizer(cfg, w: torch.Tensor, bits: int) -> WeightQuantizer:
    """The method's parametrization for weight `w` at `bits` (see qspeech.quant.registry)."""
    cfg = as_quant_config(cfg)
    return get_method(cfg.method).make_weight_quantizer(cfg, w, int(bits))


def weight_quantizer(module: nn.Module) -> WeightQuantizer | None:
    """The qspeech quantizer parametrizing module.weight, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, WeightQuantizer):
            return p
    return None


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name (relative to the s3prl model) -> module, for every module with a qspeech weight quantizer."""
    return {n: m for n, m in inner_model(model).named_modules() if weight_quantizer(m) is not None}


def remove_weight_norm(module: nn.Module) -> None:
    # s3prl's pos_conv uses the hook-based nn.utils.weight_norm, which reassigns .weight every forward.
    for hook in list(module._forward_pre_hooks.values()):
        if isinstance(hook, WeightNorm):
            torch.nn.utils.remove_weight_norm(module, hook.name)


def clone_model(model: nn.Module) -> nn.Module:
    """deepcopy that also works with the hook-based weight_norm (whose cached .weight is not a leaf): the
    copy to quantize, or a frozen teacher."""
    with torch.no_grad():
        for m in model.modules():
            for hook in m._forward_pre_hooks.values():
                if isinstance(hook, WeightNorm):
                    setattr(m, hook.name, hook.compute_weight(m))
    return copy.deepcopy(model)


def force_projection_calls(model: nn.Module, names) -> None:
    """fairseq's MultiheadAttention passes q/k/v/out_proj.weight to F.multi_head_attention_forward, so their
    forward (and an input quantizer's pre-hook) never runs; its own path calls the projections."""
    parents = {n.rsplit(".", 1)[0] for n in names if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj")}
    mods = dict(model.named_modules())
    for p in parents:
        attn = mods.get(p)
        if attn is not None and hasattr(attn, "skip_embed_dim_check"):
            attn.skip_embed_dim_check = True


def quantize_(model: nn.Module, cfg, bits: int) -> nn.Module:
    """Fake-quantize, in place, the modules that select_targets picks for (cfg, bits); returns model.

    Accepts the s3prl model or a wrapper holding it as `.model` (an Upstream). Modules that already carry a
    qspeech quantizer are left as they are, so applying it twice changes nothing. bits=32 with no
    overrides below 32 quantizes nothing.
    """
    inner = inner_model(model)
    cfg = validate_quant_config(cfg, bits, model=inner)
    method = get_method(cfg.method)
    chosen = select_targets(inner, int(bits), cfg.targets, cfg.exclude, cfg.overrides)
    mods = dict(inner.named_modules())
    act_bits = act_bits_of(cfg)
    for name, b in chosen.items():
        module = mods[name]
        if weight_quantizer(module) is not None:
            continue
        remove_weight_norm(module)
        q = method.make_weight_quantizer(cfg, module.weight.detach(), b)
        parametrize.register_parametrization(module, "weight", q)
        if act_bits is not None:
            module.input_quant = method.make_act_quantizer(cfg, name, module, int(act_bits))
            module.register_forward_pre_hook(input_quant_hook)
    if act_bits is not None:
        force_projection_calls(inner, chosen)
    return model


def remove_quantization_(model: nn.Module, keep: str = "latent") -> nn.Module:
    """Undo quantize_: keep='latent' restores the latent full-precision weights, keep='quantized' bakes the
    fake-quantized weights into plain parameters. Input quantizers are removed either way."""
    for _, module in quantized_modules(model).items():
        # deepcopies of a parametrized module share its generated class; removing the parametrization
        # deletes the property from that class, so give this module a class of its own first.
        cls = module.__class__
        module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=keep == "quantized")
        for k, h in list(module._forward_pre_hooks.items()):
            if h is input_quant_hook:
                del module._forward_pre_hooks[k]
        if hasattr(module, "input_quant"):
            del module.input_quant
    return model


@torch.no_grad()
def quantized_weight_parts(module: nn.Module) -> dict:
    """Integer codes and the scales / zero points / codebook of a quantized module, exactly as its forward
    uses them: `dequantize_parts(parts)` equals module.weight bit for bit.

    Keys: method, bits, granularity, group_size (group only), shape, format ('symmetric': w = q*s,
    'affine': w = (q - z)*s with q in [0, 2^b-1], 'binary': w = (2q - 1)*s with q in {0, 1}, 'codebook':
    w = codebook[q]), codes (int32, the weight's shape; signed for 'symmetric'), and scale / zero_point
    shaped (R, G) or codebook (R, 1, 2^b): R = 1 (tensor) or out channels, G = 1 or row/group_size
    groups of consecutive weights of the row-major flattened row. 'act' (if the input is quantized):
    bits, signed, alpha, beta (x_q = alpha*sign(x - beta) at 1 signed bit, else
    alpha*round(clip((x - beta)/alpha, Qn, Qp))); bit_exact: beta is one value per input channel (a
    tensor), sign(0) = 0, and unsigned multi-bit inputs are shifted by their tensor's minimum (BiT's code).
    """
    q = weight_quantizer(module)
    if q is None:
        raise ValueError("module has no qspeech weight quantizer")
    parts = q.parts(module.parametrizations.weight.original)
    if isinstance(getattr(module, "input_quant", None), ActQuantizer):
        aq = module.input_quant
        parts["act"] = {"bits": aq.bits, "signed": bool(aq.signed), "elastic": aq.elastic, "bit_exact": aq.bit_exact,
                        "alpha": float(aq.alpha_value()),
                        "beta": aq.beta.detach().clone() if aq.bit_exact else float(aq.beta)}
    return parts


__all__ = ["clone_model", "dequantize_parts", "force_projection_calls", "inner_model", "make_weight_quantizer",
           "quantize_", "quantized_modules", "quantized_weight_parts", "remove_quantization_", "remove_weight_norm",
           "weight_quantizer"]
