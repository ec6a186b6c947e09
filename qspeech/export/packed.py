"""The quantized upstream as a real bit-packed file (safetensors): the writer and the exact loader.

File layout (`FORMAT` "qspeech-packed", version 1), one safetensors file:

  q::<module>.codes       uint8, 1-D: the module's integer weight codes, bit-packed (qspeech.quant.packing)
  q::<module>.scale       fp16 (R, G): scales ('symmetric', 'affine', 'binary' formats)
  q::<module>.zero_point  fp16 (R, G): integer zero points ('affine' only; integers up to 255 are exact)
  q::<module>.codebook    fp16 (R, 1, 2^b): k-means levels ('codebook' format)
  <state-dict key>        every other tensor the hidden states depend on, floating point at fp16
                          (bias, LayerNorm, the non-quantized CNN / pos_conv / projections, the
                          activation quantizers' alpha/beta, ...); non-float buffers at their dtype.

Which parameter tensors a module has is its code format's (qspeech.quant.formats). Pretraining-only heads
(HuBERT's final_proj / label embeddings, wav2vec 2.0's quantizer) are not written: they never touch the
hidden states and the storage accounting leaves them out too. DistilHuBERT's prediction heads are written
(they are hidden states of that upstream), which makes its file larger than its storage_mb, whose
convention leaves them out.

The safetensors metadata (all strings) holds what rebuilds the model: format, version, name, arch,
arch_cfg (JSON), normalize, quant (the QuantConfig as JSON), bits, modules (JSON: module -> bits, shape,
format, granularity, group_size, code offset, number of codes), act (JSON: module -> bits, elastic for
input quantizers), exact ("true" when every stored value was fp16-representable).

Beside it, export_packed writes the way back to s3prl (qspeech.export.s3prl_checkpoint, `upstream.s3prl.pt`).

Exactness: qspeech.quant.round_to_storage_ rounds the evaluated model to what this file stores before
evaluation (the runner does), so `load_packed` gives hidden states with max abs diff 0 and packed_mb tracks
the accounting's storage_mb (within 2 % for HuBERT Base at 1/2/4/8 bits). An export of a model that was not
rounded still works but records exact="false" and logs a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qspeech.atomic import atomic_path
from qspeech.export.s3prl_checkpoint import export_s3prl, s3prl_path
from qspeech.quant import as_quant_config, quantized_modules, quantized_weight_parts
from qspeech.quant.api import force_projection_calls, inner_model, remove_weight_norm
from qspeech.quant.formats import FORMATS, code_format, dequantize_parts
from qspeech.quant.modules import ActQuantizer, input_quant_hook
from qspeech.quant.packing import is_storage_exact, is_stored_key, pack_codes, unpack_codes
from qspeech.upstream import Upstream, UpstreamSpec
from qspeech.upstream.builders import build_random

log = logging.getLogger(__name__)

FORMAT = "qspeech-packed"
VERSION = "1"
Q_PREFIX = "q::"
PARAMS = tuple(dict.fromkeys(p for f in FORMATS.values() for p in f.params))  # scale, zero_point, codebook

def _module_tensors(name: str, module: nn.Module, tensors: dict) -> dict:
    """Adds the packed codes and parameters of one quantized module to `tensors`; returns its metadata."""
    parts = quantized_weight_parts(module)
    fmt, b = code_format(parts), int(parts["bits"])
    off = fmt.code_offset(b)
    codes = parts["codes"].to(torch.int64) + off
    tensors[f"{Q_PREFIX}{name}.codes"] = pack_codes(codes, b)
    for k in fmt.params:
        tensors[f"{Q_PREFIX}{name}.{k}"] = parts[k].detach().to(torch.float16).contiguous()
    return {"bits": b, "shape": list(parts["shape"]), "format": fmt.name, "method": parts["method"],
            "granularity": parts["granularity"], "group_size": parts.get("group_size"), "offset": off,
            "n": int(codes.numel())}


def packed_tensors(upstream, quant_cfg=None, bits: int | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) of the packed file for a (fake-)quantized upstream."""
    model = inner_model(upstream)
    tensors: dict[str, torch.Tensor] = {}
    modules_meta: dict[str, dict] = {}
    act_meta: dict[str, dict] = {}
    for name, module in quantized_modules(model).items():
        modules_meta[name] = _module_tensors(name, module, tensors)
        if isinstance(getattr(module, "input_quant", None), ActQuantizer):
            act_meta[name] = {"bits": module.input_quant.bits, "elastic": module.input_quant.elastic}
    for key, t in model.state_dict().items():
        if not is_stored_key(key):
            continue
        t = t.detach().cpu()
        tensors[key] = (t.to(torch.float16) if t.is_floating_point() else t).contiguous()
    spec = upstream.spec
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "name": spec.name,
        "arch": spec.arch,
        "arch_cfg": json.dumps(spec.arch_cfg, sort_keys=True, default=str),
        "normalize": json.dumps(bool(upstream.normalize)),
        "source": str(spec.source),
        "quant": json.dumps(dataclasses.asdict(as_quant_config(quant_cfg)), sort_keys=True, default=str),
        "bits": str(int(bits) if bits is not None else max([m["bits"] for m in modules_meta.values()] or [32])),
        "modules": json.dumps(modules_meta, sort_keys=True),
        "act": json.dumps(act_meta, sort_keys=True),
        "exact": json.dumps(is_storage_exact(upstream)),
    }
    return tensors, meta


def export_packed(upstream, quant_cfg, bits: int, path, s3prl: bool = True) -> Path:
    """Write the bit-packed quantized upstream to `path` (safetensors; see the module docstring) and, with
    s3prl=True, the same model dequantized in s3prl's checkpoint format beside it (s3prl_path(path)).

    `upstream` is the fake-quantized Upstream as evaluated; call round_to_storage_(upstream) before
    evaluating it, or the file holds an fp16-rounded neighbour of the evaluated model (recorded as
    exact="false", with a warning)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = packed_tensors(upstream, quant_cfg, bits)
    if meta["exact"] != "true":
        log.warning("export_packed: the upstream holds values that are not fp16-representable; the file stores "
                    "them rounded, so load_packed will differ slightly from the evaluated model "
                    "(call qspeech.quant.round_to_storage_ before evaluation)")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    if s3prl:
        export_s3prl(upstream, s3prl_path(path))
    return path


def read_packed(path) -> tuple[dict, dict]:
    """(tensors, metadata with the JSON fields decoded) of a packed file."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format={raw.get('format')!r})")
    meta = dict(raw)
    for k in ("arch_cfg", "normalize", "quant", "modules", "act", "exact"):
        meta[k] = json.loads(raw[k])
    meta["bits"] = int(raw["bits"])
    return tensors, meta


def unpacked_parts(tensors: dict, name: str, info: dict) -> dict:
    """The quantized_weight_parts-style dict of one module of a packed file (codes signed again, fp32
    scales holding the stored fp16 values)."""
    codes = unpack_codes(tensors[f"{Q_PREFIX}{name}.codes"], info["bits"], info["n"]) - int(info["offset"])
    parts = {"method": info["method"], "bits": info["bits"], "granularity": info["granularity"],
             "group_size": info["group_size"], "shape": tuple(info["shape"]), "format": info["format"],
             "codes": codes.reshape(info["shape"]).to(torch.int32)}
    for k in PARAMS:
        t = tensors.get(f"{Q_PREFIX}{name}.{k}")
        parts[k] = None if t is None else t.to(torch.float32)
    return parts


def _load_plain(model: nn.Module, tensors: dict, meta: dict, path) -> None:
    """Every non-quantized tensor of the file into `model` (checked against its architecture)."""
    state = model.state_dict()
    plain = {}
    for k, t in tensors.items():
        if k.startswith(Q_PREFIX):
            continue
        if k not in state:
            raise ValueError(f"{path}: tensor '{k}' does not fit the {meta['arch']} architecture in its metadata")
        plain[k] = t.to(state[k].dtype)
    missing, unexpected = model.load_state_dict(plain, strict=False)
    quantized_weights = {f"{n}.weight" for n in meta["modules"]}
    bad = [k for k in missing if k not in quantized_weights and is_stored_key(k)]
    if bad or unexpected:
        raise ValueError(f"{path}: missing tensors {bad[:5]} / unexpected {list(unexpected)[:5]}")


def load_packed(path, keep_parts: bool = False):
    """Rebuild the Upstream of a packed file: the architecture from its metadata, the quantized modules'
    weights dequantized from their codes (plain fp32 parameters, values identical to the fake-quantized
    weights), input quantizers re-attached, every other tensor from its fp16 copy. Pretraining-only heads
    keep their random initialisation (they do not reach the hidden states). With keep_parts=True the
    unpacked parts are kept on `upstream.packed_parts` (module -> parts); the metadata is on
    `upstream.packed_meta`."""
    tensors, meta = read_packed(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = build_random(meta["arch"], meta["arch_cfg"])
    mods = dict(model.named_modules())
    packed_parts = {}
    for name, info in meta["modules"].items():
        parts = unpacked_parts(tensors, name, info)
        module = mods[name]
        remove_weight_norm(module)
        module.weight = nn.Parameter(dequantize_parts(parts).to(module.weight.dtype), requires_grad=False)
        if keep_parts:
            packed_parts[name] = parts
    for name, info in meta["act"].items():
        module = mods[name]
        module.input_quant = ActQuantizer(int(info["bits"]), elastic=bool(info["elastic"]))
        module.register_forward_pre_hook(input_quant_hook)
    if meta["act"]:
        force_projection_calls(model, list(meta["act"]))
    _load_plain(model, tensors, meta, path)
    spec = UpstreamSpec(meta["name"], meta["arch"], meta["arch_cfg"], str(path), None)
    upstream = Upstream(model, spec, bool(meta["normalize"]))
    upstream.requires_grad_(False)
    upstream.packed_meta = meta
    if keep_parts:
        upstream.packed_parts = packed_parts
    return upstream


__all__ = ["FORMAT", "export_packed", "load_packed", "packed_tensors", "read_packed", "unpacked_parts"]
