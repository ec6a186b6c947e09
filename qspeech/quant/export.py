"""The quantized upstream as a real bit-packed file (safetensors) and back.

File layout (`FORMAT` "qspeech-packed", version 1), one safetensors file:

  q::<module>.codes       uint8, 1-D: the module's integer weight codes, bit-packed (see `pack_codes`)
  q::<module>.scale       fp16 (R, G): scales ('symmetric', 'affine', 'binary' formats)
  q::<module>.zero_point  fp16 (R, G): integer zero points ('affine' only; integers up to 255 are exact)
  q::<module>.codebook    fp16 (R, 1, 2^b): k-means levels ('codebook' format)
  <state-dict key>        every other tensor the hidden states depend on, floating point at fp16
                          (bias, LayerNorm, the non-quantized CNN / pos_conv / projections, the
                          activation quantizers' alpha/beta, ...); non-float buffers at their dtype.

Pretraining-only heads (HuBERT's final_proj / label embeddings, wav2vec 2.0's quantizer) are not written:
they never touch the hidden states and the storage accounting leaves them out too. DistilHuBERT's
prediction heads are written (they are hidden states of that upstream), which makes its file larger than
its storage_mb, whose convention leaves them out.

The safetensors metadata (all strings) holds what rebuilds the model: format, version, name, arch,
arch_cfg (JSON), normalize, quant (the QuantConfig as JSON), bits, modules (JSON: module -> bits, shape,
format, granularity, group_size, code offset, number of codes), act (JSON: module -> bits, elastic for
input quantizers), exact ("true" when every stored value was fp16-representable, see below).

Code packing (`pack_codes`): codes are first made unsigned (symmetric codes get +2^(b-1), so q in
[-(2^(b-1)-1), 2^(b-1)-1] or LSQ's [-2^(b-1), 2^(b-1)-1] lands in [0, 2^b-1]; 'binary' codes are 0/1 for
-s/+s; 'affine' and 'codebook' codes already are), flattened row-major in the weight's own shape, and
written as one little-endian bit stream: code i occupies stream bits [i*b, (i+1)*b), least significant
bit first, and stream bit k is bit (k mod 8) of byte k // 8 (so at 2 bits, byte 0 = c0 | c1<<2 | c2<<4 |
c3<<6). Any b from 1 to 8 packs densely this way (3 bits: 8 codes in 3 bytes) and 16 bits is the codes'
little-endian uint16 bytes. The last byte is zero-padded.

Exactness. The evaluated fake-quant model is fp32; the file stores fp16 (the paper's storage convention:
everything but the codes at 16 bits), so the two are identical only if the evaluated model's values
were already fp16-representable. `round_to_storage_(upstream)` does that in place *before evaluation*
(the runner calls it right after quantization): every tensor that the file stores as fp16 (the
non-quantized parameters and buffers, the scales / zero points / codebooks / LSQ steps, the activation
quantizers' alpha and beta) is rounded to its nearest fp16 value; the latent full-precision weights of
the quantized modules are left alone (only their codes are stored, and those are recomputed from the
rounded scales). BiT's 1-bit quantizer recomputes its scale mean|W| from the latent weights in every
forward; round_to_storage_ freezes it (`FrozenBinaryWeight`, same codes, fp16 scale buffer). The result
is the honest model: what was evaluated is exactly what the file holds, packed_mb tracks storage_mb
(within 2 % for HuBERT Base at 1/2/4/8 bits), and `load_packed` gives hidden states with max abs diff 0.
An export of a model that was not rounded still works but records exact="false" and logs a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qspeech.atomic import atomic_path
from qspeech.quant import functional as Fq
from qspeech.quant.api import force_projection_calls, inner_model, quantized_modules, quantized_weight_parts, weight_quantizer
from qspeech.quant.config import as_quant_config
from qspeech.quant.modules import ActQuantizer, BinaryWeight, WeightQuantizer, dequantize_parts, input_quant_hook
from qspeech.quant.targets import PRETRAINING_HEADS

log = logging.getLogger(__name__)

FORMAT = "qspeech-packed"
VERSION = "1"
Q_PREFIX = "q::"
FP16_MIN_POS = 2.0**-24  # smallest positive fp16 (subnormal)
FP16_MAX = 65504.0

# ----------------------------------------------------------------------------------- bit packing


def packed_nbytes(n: int, bits: int) -> int:
    return (int(n) * int(bits) + 7) // 8


def pack_codes(codes, bits: int) -> torch.Tensor:
    """Unsigned integer codes in [0, 2^bits-1] (any shape, flattened row-major) -> uint8 bit stream
    (LSB first, see the module docstring). bits: 1..8 or 16."""
    bits = int(bits)
    c = torch.as_tensor(codes).reshape(-1).to(torch.int64).numpy()
    n = c.size
    if c.size and (c.min() < 0 or c.max() >= 2**bits):
        raise ValueError(f"codes outside [0, {2**bits - 1}] for {bits} bits")
    if bits == 16:
        return torch.from_numpy(c.astype("<u2").view(np.uint8).copy())
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes (1..8 or 16)")
    if bits == 8:
        return torch.from_numpy(c.astype(np.uint8))
    if 8 % bits == 0:  # 1, 2, 4: whole codes per byte
        per = 8 // bits
        pad = (-n) % per
        g = np.concatenate([c, np.zeros(pad, np.int64)]).reshape(-1, per).astype(np.uint8)
        out = np.zeros(g.shape[0], np.uint8)
        for j in range(per):
            out |= g[:, j] << np.uint8(j * bits)
        return torch.from_numpy(out)
    # 3, 5, 6, 7: 8 codes -> `bits` bytes through a 64-bit word
    pad = (-n) % 8
    g = np.concatenate([c, np.zeros(pad, np.int64)]).reshape(-1, 8).astype(np.uint64)
    word = np.zeros(g.shape[0], np.uint64)
    for j in range(8):
        word |= g[:, j] << np.uint64(j * bits)
    out = np.stack([(word >> np.uint64(8 * k)) & np.uint64(0xFF) for k in range(bits)], 1).astype(np.uint8)
    return torch.from_numpy(out.reshape(-1)[: packed_nbytes(n, bits)].copy())


def unpack_codes(packed, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes: the first n codes (int64, 1-D)."""
    bits, n = int(bits), int(n)
    b = torch.as_tensor(packed).reshape(-1).numpy().astype(np.uint8)
    if bits == 16:
        return torch.from_numpy(b[: 2 * n].view("<u2").astype(np.int64))
    if bits == 8:
        return torch.from_numpy(b[:n].astype(np.int64))
    if 8 % bits == 0:
        per = 8 // bits
        mask = np.uint8(2**bits - 1)
        g = np.stack([(b >> np.uint8(j * bits)) & mask for j in range(per)], 1)
        return torch.from_numpy(g.reshape(-1)[:n].astype(np.int64))
    nb = packed_nbytes(-(-n // 8) * 8, bits)
    b = np.concatenate([b, np.zeros(nb - b.size, np.uint8)]).reshape(-1, bits).astype(np.uint64)
    word = np.zeros(b.shape[0], np.uint64)
    for k in range(bits):
        word |= b[:, k] << np.uint64(8 * k)
    mask = np.uint64(2**bits - 1)
    g = np.stack([(word >> np.uint64(j * bits)) & mask for j in range(8)], 1)
    return torch.from_numpy(g.reshape(-1)[:n].astype(np.int64))


def code_offset(fmt: str, bits: int) -> int:
    """What pack/unpack adds to / subtracts from the codes of a format to make them unsigned."""
    return 2 ** (int(bits) - 1) if fmt == "symmetric" else 0


# ----------------------------------------------------------------------------------- fp16 storage


def fp16_round(t: torch.Tensor, positive: bool = False) -> torch.Tensor:
    """Nearest fp16 value in t's dtype (clamped to fp16's range; positive=True keeps scales > 0)."""
    r = t.detach().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(t.dtype)
    if positive:
        r = r.clamp_min(FP16_MIN_POS)
    return r


def _fp16_exact(t: torch.Tensor) -> bool:
    if not t.is_floating_point():
        return True
    return bool(torch.equal(t.detach().to(torch.float16).to(t.dtype), t.detach()))


class FrozenBinaryWeight(WeightQuantizer):
    """BiT's 1-bit weights, sign(W - mean W) * s, with s = mean|W| frozen into a buffer (fp16-representable)
    so that it can be stored. Made by round_to_storage_ from a trained BinaryWeight; same codes."""

    method = "bit"

    def __init__(self, w, granularity="channel", group_size=128):
        super().__init__(w.shape, 1, granularity, group_size)
        self.register_buffer("scale", fp16_round(Fq.binary_scale(self.groups(w.detach())), positive=True))

    def forward(self, w):
        wg = self.groups(w)
        return Fq.from_groups(Fq.binary_fake(wg, self.scale, center=True), w.shape)

    def parts(self, w):
        wg = self.groups(w.detach())
        return {**self._meta(), "format": "binary",
                "codes": Fq.from_groups(Fq.binary_codes(wg, center=True), w.shape).to(torch.int32),
                "scale": self.scale.clone()}


def _is_stored_key(key: str) -> bool:
    """State-dict keys written as plain tensors: not pretraining heads, not quantizer internals."""
    return key.split(".")[0] not in PRETRAINING_HEADS and ".parametrizations." not in key


@torch.no_grad()
def round_to_storage_(upstream) -> dict:
    """Round, in place, every value the packed file stores at fp16 to its nearest fp16 value, so that the
    evaluated model is exactly the stored one (see the module docstring). Call it after quantization and
    before evaluation; idempotent. Returns {'tensors': number rounded, 'changed': how many changed,
    'max_rel_change': largest relative change of a tensor (L2)}."""
    model = inner_model(upstream)
    n, changed, worst = 0, 0, 0.0

    def apply(t: torch.Tensor, positive=False):
        nonlocal n, changed, worst
        if t is None or not t.is_floating_point():
            return
        r = fp16_round(t, positive)
        n += 1
        if not torch.equal(r, t):
            changed += 1
            worst = max(worst, float((r - t).norm() / t.norm().clamp_min(1e-30)))
            t.copy_(r)

    for module in list(quantized_modules(model).values()):
        q = weight_quantizer(module)
        if isinstance(q, BinaryWeight) and not isinstance(q, FrozenBinaryWeight):
            plist = module.parametrizations.weight
            idx = next(i for i, p in enumerate(plist) if p is q)
            plist[idx] = FrozenBinaryWeight(plist.original, q.granularity, q.group_size)
            n += 1
            changed += 1
            continue
        for name, t in list(q.named_parameters()) + list(q.named_buffers()):
            apply(t.data, positive=name in ("scale", "step"))
    state = model.state_dict(keep_vars=True)
    for key, t in state.items():
        if _is_stored_key(key):
            apply(t.data)
    return {"tensors": n, "changed": changed, "max_rel_change": worst}


def is_storage_exact(upstream) -> bool:
    """True when the packed file would hold exactly this model (round_to_storage_ has been applied)."""
    model = inner_model(upstream)
    for module in quantized_modules(model).values():
        q = weight_quantizer(module)
        if isinstance(q, BinaryWeight):
            return False
        for t in list(q.parameters()) + list(q.buffers()):
            if not _fp16_exact(t):
                return False
    return all(_fp16_exact(t) for k, t in model.state_dict().items() if _is_stored_key(k))


# ----------------------------------------------------------------------------------- export


def _quant_meta(quant_cfg) -> dict:
    return dataclasses.asdict(as_quant_config(quant_cfg))


def packed_tensors(upstream, quant_cfg=None, bits: int | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) of the packed file for a (fake-)quantized upstream."""
    model = inner_model(upstream)
    tensors: dict[str, torch.Tensor] = {}
    modules_meta: dict[str, dict] = {}
    act_meta: dict[str, dict] = {}
    qmods = quantized_modules(model)
    for name, module in qmods.items():
        parts = quantized_weight_parts(module)
        fmt, b = parts["format"], int(parts["bits"])
        off = code_offset(fmt, b)
        codes = parts["codes"].to(torch.int64) + off
        tensors[f"{Q_PREFIX}{name}.codes"] = pack_codes(codes, b)
        for k in ("scale", "zero_point", "codebook"):
            if parts.get(k) is not None:
                tensors[f"{Q_PREFIX}{name}.{k}"] = parts[k].detach().to(torch.float16).contiguous()
        modules_meta[name] = {"bits": b, "shape": list(parts["shape"]), "format": fmt, "method": parts["method"],
                              "granularity": parts["granularity"], "group_size": parts.get("group_size"),
                              "offset": off, "n": int(codes.numel())}
        if isinstance(getattr(module, "input_quant", None), ActQuantizer):
            act_meta[name] = {"bits": module.input_quant.bits, "elastic": module.input_quant.elastic}
    for key, t in model.state_dict().items():
        if not _is_stored_key(key):
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
        "quant": json.dumps(_quant_meta(quant_cfg), sort_keys=True, default=str),
        "bits": str(int(bits) if bits is not None else max([m["bits"] for m in modules_meta.values()] or [32])),
        "modules": json.dumps(modules_meta, sort_keys=True),
        "act": json.dumps(act_meta, sort_keys=True),
        "exact": json.dumps(is_storage_exact(upstream)),
    }
    return tensors, meta


def export_packed(upstream, quant_cfg, bits: int, path) -> Path:
    """Write the bit-packed quantized upstream to `path` (safetensors; see the module docstring).

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
                    "(call qspeech.quant.export.round_to_storage_ before evaluation)")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
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
    for k in ("scale", "zero_point", "codebook"):
        t = tensors.get(f"{Q_PREFIX}{name}.{k}")
        parts[k] = None if t is None else t.to(torch.float32)
    return parts


def load_packed(path, keep_parts: bool = False):
    """Rebuild the Upstream of a packed file: the architecture from its metadata, the quantized modules'
    weights dequantized from their codes (plain fp32 parameters, values identical to the fake-quantized
    weights), input quantizers re-attached, every other tensor from its fp16 copy. Pretraining-only heads
    keep their random initialisation (they do not reach the hidden states). With keep_parts=True the
    unpacked parts are kept on `upstream.packed_parts` (module -> parts); the metadata is on
    `upstream.packed_meta`."""
    from qspeech.quant.api import remove_weight_norm
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
        w = dequantize_parts(parts)
        module.weight = nn.Parameter(w.to(module.weight.dtype), requires_grad=False)
        if keep_parts:
            packed_parts[name] = parts
    for name, info in meta["act"].items():
        module = mods[name]
        module.input_quant = ActQuantizer(int(info["bits"]), elastic=bool(info["elastic"]))
        module.register_forward_pre_hook(input_quant_hook)
    if meta["act"]:
        force_projection_calls(model, list(meta["act"]))
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
    bad = [k for k in missing if k not in quantized_weights and _is_stored_key(k)]
    if bad or unexpected:
        raise ValueError(f"{path}: missing tensors {bad[:5]} / unexpected {list(unexpected)[:5]}")
    spec = UpstreamSpec(meta["name"], meta["arch"], meta["arch_cfg"], str(path), None)
    upstream = Upstream(model, spec, bool(meta["normalize"]))
    upstream.requires_grad_(False)
    upstream.packed_meta = meta
    if keep_parts:
        upstream.packed_parts = packed_parts
    return upstream


# ----------------------------------------------------------------------------------- CLI


def export_sizes(cfg, upstream, path: Path) -> dict:
    """packed_mb (file size) next to the accounting's storage_mb."""
    from qspeech.runner import compute_cost

    packed_mb = path.stat().st_size / 1e6
    storage_mb = compute_cost(cfg, upstream).storage_mb
    return {"packed_mb": round(packed_mb, 4), "storage_mb": round(storage_mb, 4),
            "packed_vs_storage": round(packed_mb / storage_mb, 4) if storage_mb else None}


def main(cfg, run_dir=None) -> dict:
    """`qspeech export`: build the upstream of the run config, quantize it per cfg.quant / cfg.bits, round it
    to its storage (round_to_storage_), write run_dir/upstream.packed.safetensors, reload it, check the hidden
    states are identical on 1 s of noise, print the path and packed vs accounted sizes; writes export.json."""
    from qspeech.config import output_dir
    from qspeech.results import write_json_atomic
    from qspeech.runner import quantize_upstream
    from qspeech.seeding import seed_everything
    from qspeech.upstream import build_upstream

    run_dir = output_dir(run_dir)
    seed_everything(int(cfg.seed))
    upstream = build_upstream(cfg.model)
    upstream = quantize_upstream(cfg, upstream, run_dir)
    rounding = round_to_storage_(upstream)
    path = export_packed(upstream, cfg.quant, int(cfg.bits), run_dir / "upstream.packed.safetensors")
    out = {"path": str(path), "bits": int(cfg.bits), "quant": cfg.quant.method, "rounding": rounding}
    out.update(export_sizes(cfg, upstream, path))
    loaded = load_packed(path)
    g = torch.Generator().manual_seed(0)
    wav = torch.randn(1, 16000, generator=g) * 0.1
    with torch.inference_mode():
        a = upstream(wav).hidden_states
        b = loaded(wav).hidden_states
    out["reload_max_abs_diff"] = max(float((x - y).abs().max()) for x, y in zip(a, b))
    write_json_atomic(run_dir / "export.json", out)
    print(f"[qspeech] {cfg.model.name} {cfg.quant.method} {cfg.bits}-bit -> {path}\n"
          f"  packed {out['packed_mb']:.3f} MB vs accounted storage {out['storage_mb']:.3f} MB "
          f"(x{out['packed_vs_storage']}); reload max |diff| {out['reload_max_abs_diff']:g}")
    return out


__all__ = ["FORMAT", "FrozenBinaryWeight", "export_packed", "is_storage_exact", "load_packed", "main",
           "pack_codes", "packed_nbytes", "packed_tensors", "read_packed", "round_to_storage_", "unpack_codes",
           "unpacked_parts"]
