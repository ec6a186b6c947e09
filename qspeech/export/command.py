"""`qspeech export`: the run config's upstream quantized, written as the packed file and the s3prl checkpoint,
both reloaded and checked exact; export.json written, the sizes printed."""

from __future__ import annotations

from pathlib import Path

import torch

from qspeech.atomic import write_json_atomic
from qspeech.config import output_dir
from qspeech.cost import account_quantized
from qspeech.export.packed import export_packed, load_packed
from qspeech.export.s3prl_checkpoint import load_s3prl, s3prl_path
from qspeech.quantize_upstream import quantize_upstream
from qspeech.quant import round_to_storage_
from qspeech.seeding import seed_everything
from qspeech.upstream import build_upstream


def export_sizes(cfg, upstream, path: Path) -> dict:
    """packed_mb (file size) next to the accounting's storage_mb."""
    packed_mb = path.stat().st_size / 1e6
    storage_mb = account_quantized(upstream, cfg.quant, int(cfg.bits), float(cfg.cost.seconds)).storage_mb
    return {"packed_mb": round(packed_mb, 4), "storage_mb": round(storage_mb, 4),
            "packed_vs_storage": round(packed_mb / storage_mb, 4) if storage_mb else None}


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


__all__ = ["export_sizes", "main", "reload_max_abs_diff"]
