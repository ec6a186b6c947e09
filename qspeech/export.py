"""The quantized upstream as a real bit-packed file (safetensors) and back, and the `qspeech export` command.

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

Beside it, export_packed writes the way back to s3prl (export_s3prl, `upstream.s3prl.pt`): the same model with
its quantized weights dequantized to fp32, in s3prl's own checkpoint format for its class (the configs of
the checkpoint it came from), loadable by `model.ckpt=` and by s3prl; its hidden states equal the evaluated
model's. Activation quantizers have no s3prl equivalent: such a model gets no s3prl file.

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
from torch import nn

from qspeech.atomic import atomic_path, write_json_atomic
from qspeech.quant import as_quant_config, quantized_modules, quantized_weight_parts
from qspeech.quant.api import force_projection_calls, inner_model, remove_weight_norm
from qspeech.quant.formats import FORMATS, code_format, dequantize_parts
from qspeech.quant.modules import ActQuantizer, input_quant_hook
from qspeech.quant.packing import is_storage_exact, is_stored_key, pack_codes, unpack_codes

log = logging.getLogger(__name__)

FORMAT = "qspeech-packed"
VERSION = "1"
Q_PREFIX = "q::"
PARAMS = tuple(dict.fromkeys(p for f in FORMATS.values() for p in f.params))  # scale, zero_point, codebook

# ----------------------------------------------------------------------------------- export


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
    from safetensors.torch import save_file

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


# ----------------------------------------------------------------------------------- load


def read_packed(path) -> tuple[dict, dict]:
    """(tensors, metadata with the JSON fields decoded) of a packed file."""
    from safetensors import safe_open

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
    from qspeech.upstream import Upstream, UpstreamSpec
    from qspeech.upstream.builders import build_random

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


# ----------------------------------------------------------------------------------- s3prl format

S3PRL_SUFFIX = ".s3prl.pt"
# Where each s3prl checkpoint format keeps the model's state dict, and the other keys it carries
# (qspeech.upstream.checkpoints.FORMATS, builders.build_from_state).
S3PRL_WEIGHTS = {"hubert": "model_weight", "wav2vec2": "model_weight", "distiller": "Distiller", "wavlm": "model"}
S3PRL_KEEP = {"hubert": ("task_cfg", "model_cfg", "dictionaries_symbols"), "wav2vec2": ("task_cfg", "model_cfg"),
              "distiller": ("Config",), "wavlm": ("cfg",)}
WEIGHT_NORM_DIM = 2  # s3prl builds every pos_conv with nn.utils.weight_norm(name="weight", dim=2)


def s3prl_path(packed_path) -> Path:
    """The s3prl checkpoint beside a packed file: upstream.packed.safetensors -> upstream.s3prl.pt."""
    packed_path = Path(packed_path)
    stem = packed_path.name
    for suffix in (".packed.safetensors", ".safetensors"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return packed_path.with_name(stem + S3PRL_SUFFIX)


def _weight_norm_parts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_g, weight_v) whose weight_norm is exactly `w`: g is the norm torch's weight_norm itself
    computes, so g / ||v|| is exactly 1."""
    _, norms = torch._weight_norm_interface(w, torch.ones(1, 1, w.shape[WEIGHT_NORM_DIM], dtype=w.dtype),
                                            WEIGHT_NORM_DIM)
    g = norms.reshape(1, 1, -1)
    if not torch.equal(torch._weight_norm(w, g, WEIGHT_NORM_DIM), w):  # another torch: exact up to rounding
        g = torch.norm_except_dim(w, 2, WEIGHT_NORM_DIM)
    return g, w.clone()


@torch.no_grad()
def dequantized_weights(upstream) -> dict[str, torch.Tensor]:
    """The evaluated model's state dict under its s3prl class's keys: each quantized weight as the values
    its forward uses (codes x scales, fp32), every other tensor as it is."""
    from qspeech.quant.targets import module_kind

    model = inner_model(upstream)
    weights = {k: t.detach().cpu().clone() for k, t in model.state_dict().items() if ".parametrizations." not in k}
    for name, module in quantized_modules(model).items():
        w = module.weight.detach().cpu().float().contiguous()  # the fake-quantized weight its forward uses
        if module_kind(name, module) == "pos_conv":  # quantizing removed its weight_norm; s3prl's class has it
            weights[f"{name}.weight_g"], weights[f"{name}.weight_v"] = _weight_norm_parts(w)
        else:
            weights[f"{name}.weight"] = w
    return weights


def _s3prl_template(upstream) -> dict:
    """The checkpoint's non-weight entries: those of the s3prl file the upstream was loaded from (its
    configs and label dictionaries, read without loading its tensors), else built from the architecture."""
    from qspeech.upstream import builders

    arch, source = upstream.spec.arch, Path(str(upstream.spec.source))
    if source.is_file() and source.suffix != ".safetensors":
        try:
            state = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
            if all(k in state for k in S3PRL_KEEP[arch] if k != "dictionaries_symbols"):
                return {k: state[k] for k in S3PRL_KEEP[arch] if k in state}
        except Exception as e:  # not an s3prl file after all: rebuild the entries from the architecture
            log.debug("s3prl template from %s failed: %s", source, e)
    arch_cfg = dict(upstream.spec.arch_cfg)
    if arch == "wavlm":  # what build_random used
        arch_cfg = {**builders.WAVLM_BASE_PLUS, **arch_cfg}
    if arch == "hubert":  # a required field of s3prl's HubertConfig (builders.hubert_model defaults it)
        arch_cfg = {"label_rate": 50.0, **arch_cfg}
    extra = {"task_cfg": {"normalize": bool(upstream.normalize), "sample_rate": 16000, "label_rate": 50.0}}
    state = builders.to_state(arch, inner_model(upstream), arch_cfg, extra)
    return {k: v for k, v in state.items() if k != S3PRL_WEIGHTS[arch]}


def export_s3prl(upstream, path) -> Path | None:
    """Write the fake-quantized upstream, dequantized to fp32, as a checkpoint in s3prl's own format for its
    model class (HubertModel, Wav2Vec2Model, DistillerModel, WavLM): loadable by `model.ckpt=` and by s3prl.
    Returns None for an upstream without weights (FBANK), and (with a warning) for one that quantizes
    activations, which s3prl's classes cannot."""
    from qspeech.atomic import torch_save_atomic

    if upstream.spec.arch not in S3PRL_WEIGHTS:  # FBANK: no weights, nothing for s3prl to load
        return None
    model = inner_model(upstream)
    if any(isinstance(getattr(m, "input_quant", None), ActQuantizer) for m in model.modules()):
        log.warning("export: activation quantization (quant.act_bits) has no s3prl equivalent; "
                    "no s3prl checkpoint written (the packed file keeps it)")
        return None
    arch = upstream.spec.arch
    state = _s3prl_template(upstream) | {S3PRL_WEIGHTS[arch]: dequantized_weights(upstream)}
    return torch_save_atomic(state, path)


# ----------------------------------------------------------------------------------- CLI


def export_sizes(cfg, upstream, path: Path) -> dict:
    """packed_mb (file size) next to the accounting's storage_mb."""
    from qspeech.cost import account_quantized

    packed_mb = path.stat().st_size / 1e6
    storage_mb = account_quantized(upstream, cfg.quant, int(cfg.bits), float(cfg.cost.seconds)).storage_mb
    return {"packed_mb": round(packed_mb, 4), "storage_mb": round(storage_mb, 4),
            "packed_vs_storage": round(packed_mb / storage_mb, 4) if storage_mb else None}


def load_s3prl(model_cfg, path):
    """The Upstream of an s3prl checkpoint, as `model.ckpt=path` loads it (weights_only=True), frozen as the
    tasks run it (torch's attention takes another, not bit-identical, kernel while weights require grad)."""
    from qspeech.upstream import build_upstream

    return build_upstream(dataclasses.replace(model_cfg, ckpt=str(path), init="pretrained")).requires_grad_(False)


def reload_max_abs_diff(upstream, path, loaded=None) -> float:
    """Largest |difference| of any hidden state between `upstream` and load_packed(path) (or `loaded`) on
    1 s of noise."""
    loaded = loaded if loaded is not None else load_packed(path)
    wav = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.inference_mode():
        a = upstream(wav).hidden_states
        b = loaded(wav).hidden_states
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def main(cfg, run_dir=None) -> dict:
    """`qspeech export`: build the upstream of the run config, quantize it per cfg.quant / cfg.bits, round it
    to its storage (round_to_storage_), write run_dir/upstream.packed.safetensors, reload it, check the hidden
    states are identical on 1 s of noise, print the path and packed vs accounted sizes; writes export.json."""
    from qspeech.config import output_dir
    from qspeech.quantize_upstream import quantize_upstream
    from qspeech.quant import round_to_storage_
    from qspeech.seeding import seed_everything
    from qspeech.upstream import build_upstream

    run_dir = output_dir(run_dir)
    seed_everything(int(cfg.seed))
    upstream = quantize_upstream(cfg, build_upstream(cfg.model), run_dir)
    rounding = round_to_storage_(upstream)
    path = export_packed(upstream, cfg.quant, int(cfg.bits), run_dir / "upstream.packed.safetensors")
    out = {"path": str(path), "bits": int(cfg.bits), "quant": cfg.quant.method, "rounding": rounding}
    out.update(export_sizes(cfg, upstream, path))
    out["reload_max_abs_diff"] = reload_max_abs_diff(upstream, path)
    s3prl = s3prl_path(path)
    if s3prl.is_file():
        out["s3prl_path"] = str(s3prl)
        out["s3prl_reload_max_abs_diff"] = reload_max_abs_diff(upstream, s3prl, load_s3prl(cfg.model, s3prl))
    write_json_atomic(run_dir / "export.json", out)
    print(f"[qspeech] {cfg.model.name} {cfg.quant.method} {cfg.bits}-bit -> {path}\n"
          f"  packed {out['packed_mb']:.3f} MB vs accounted storage {out['storage_mb']:.3f} MB "
          f"(x{out['packed_vs_storage']}); reload max |diff| {out['reload_max_abs_diff']:g}")
    if "s3prl_path" in out:
        print(f"  s3prl checkpoint (dequantized, model.ckpt={s3prl}): reload max |diff| "
              f"{out['s3prl_reload_max_abs_diff']:g}")
    return out


__all__ = ["FORMAT", "dequantized_weights", "export_packed", "export_s3prl", "load_packed", "load_s3prl", "main",
           "packed_tensors", "read_packed", "s3prl_path", "unpacked_parts"]
