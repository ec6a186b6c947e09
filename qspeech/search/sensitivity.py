"""Per-module sensitivity: the damage to the upstream's hidden states when one module alone is quantized.

damage(m, b) = mean over the measured hidden states of ||h_q - h||^2 / ||h||^2 on the valid frames, where h_q
comes from the upstream with module m quantized to b bits by the configured method (as quantize_ applies it:
untrained for QAT methods) and everything else at full precision. Damages of different modules are summed to
predict an allocation's damage (the usual additive proxy of mixed-precision search).

Measured once per (upstream weights, quantizer settings, audio, measure) and cached as JSON under
<cache_dir>/search/; a later call computes only the (module, bits) pairs it lacks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from qspeech.atomic import write_json_atomic
from qspeech.data import read_audio
from qspeech.feature_cache import pad_waves
from qspeech.identity import identity_dict
from qspeech.quant import QuantConfig, clone_model, quantize_, remove_quantization_
from qspeech.upstream import fingerprint

log = logging.getLogger(__name__)
CACHE_VERSION = 1
SAMPLE_RATE = 16_000
# Quant fields that choose modules, not how a module is quantized: not part of the sensitivity's key.
SELECTION_FIELDS = ("targets", "exclude", "overrides")


def load_audio(utts: Sequence, n: int, max_seconds: float) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The first `n` utterances, each cut to `max_seconds`, as a padded batch; and their signature (id, path,
    size, samples) for the cache key."""
    wavs, sig = [], []
    for u in list(utts)[:n]:
        w = read_audio(u.path)[: int(max_seconds * SAMPLE_RATE)]
        wavs.append(w)
        try:
            size = os.path.getsize(u.path)
        except OSError:
            size = None
        sig.append([u.utt_id, str(u.path), size, len(w)])
    batch, lens = pad_waves(wavs)
    return batch, lens, sig


def sensitivity_key(upstream, quant: QuantConfig, measure: str, audio_sig: list) -> str:
    method = {k: v for k, v in identity_dict(quant).items() if k not in SELECTION_FIELDS}
    payload = json.dumps({"v": CACHE_VERSION, "upstream": fingerprint(upstream), "quant": method,
                          "measure": measure, "audio": audio_sig}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _hidden(upstream, wavs: torch.Tensor, lens: torch.Tensor, measure: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    out = upstream(wavs, lens)
    hs = list(out.hidden_states) if measure == "all" else [out.hidden_states[-1]]
    mask = (torch.arange(hs[0].shape[1])[None, :] < out.lengths[:, None]).unsqueeze(-1).to(hs[0].dtype)
    return [h * mask for h in hs], mask


def relative_error(hs: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """Mean over hidden states of ||h - r||^2 / ||r||^2 (frames past each length are zero in both)."""
    errs = [float((h - r).pow(2).sum() / r.pow(2).sum().clamp_min(1e-12)) for h, r in zip(hs, ref)]
    return float(np.mean(errs))


@torch.no_grad()
def measure(upstream, quant: QuantConfig, modules: Iterable[str], bits: Iterable[int], wavs: torch.Tensor,
            lens: torch.Tensor, how: str = "all", known: dict | None = None, progress: bool = True) -> dict:
    """{module: {bits: damage}} for every module and bit width (32 -> 0); pairs in `known` are kept, not
    measured again. The upstream is not changed (a copy is quantized, one module at a time)."""
    out = {m: dict(v) for m, v in (known or {}).items()}
    todo = [(m, int(b)) for m in modules for b in bits if int(b) < 32 and str(int(b)) not in out.get(m, {})]
    for m in modules:
        out.setdefault(m, {})
        for b in bits:
            if int(b) >= 32:
                out[m][str(int(b))] = 0.0
    if not todo:
        return out
    model = clone_model(upstream)
    model.eval()
    ref, _ = _hidden(model, wavs, lens, how)
    # Everything else stays full precision: a copy of the config quantizing one module by name at a time.
    base = dataclasses.replace(quant, targets=[], exclude=[], overrides={})
    for m, b in tqdm(todo, desc="sensitivity", disable=not progress, dynamic_ncols=True):
        quantize_(model, dataclasses.replace(base, overrides={m: b}), 32)
        hs, _ = _hidden(model, wavs, lens, how)
        remove_quantization_(model.model, keep="latent")  # the module's own full-precision weight back
        out[m][str(b)] = relative_error(hs, ref)
    return out


def cached_sensitivity(upstream, quant: QuantConfig, modules: Sequence[str], bits: Sequence[int], utts: Sequence,
                       n_utts: int, max_seconds: float, how: str, cache_dir, progress: bool = True) -> tuple[dict, dict]:
    """(damages {module: {bits: damage}}, info {key, path, status: hit | miss | partial, measured pairs})."""
    wavs, lens, sig = load_audio(utts, n_utts, max_seconds)
    key = sensitivity_key(upstream, quant, how, sig)
    path = Path(cache_dir) / "search" / f"sensitivity_{upstream.spec.name}_{quant.method}_{key}.json"
    known: dict = {}
    if path.is_file():
        try:
            known = json.loads(path.read_text())["damage"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("sensitivity cache %s is unreadable (%s); measuring again", path, e)
    want = [(m, str(int(b))) for m in modules for b in bits if int(b) < 32]
    missing = sum(1 for m, b in want if b not in known.get(m, {}))
    damage = measure(upstream, quant, modules, bits, wavs, lens, how, known, progress)
    if missing:
        write_json_atomic(path, {"version": CACHE_VERSION, "key": key, "model": upstream.spec.name,
                                 "method": quant.method, "measure": how, "audio": sig, "damage": damage})
    status = "hit" if not missing else ("miss" if missing == len(want) else "partial")
    info = {"key": key, "path": str(path), "status": status, "measured": missing, "utterances": len(sig),
            "seconds": round(float(lens.sum()) / SAMPLE_RATE, 2)}
    return {m: {int(b): float(v) for b, v in damage[m].items()} for m in modules}, info
