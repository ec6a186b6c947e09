"""prepare_quantized_upstream: PTQ in place, or QAT by layer-wise distillation from a full-precision teacher
(DistilHuBERT's L1 + log-sigmoid cosine, or BiT's MSE) with checkpoints, resume and a cache of results."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qspeech.atomic import torch_save_atomic, write_json_atomic
from qspeech.errors import ConfigError, DataError, TrainingError
from qspeech.quant.api import quantize_, remove_quantization_
from qspeech.quant.config import PTQ_METHODS, QuantConfig, cache_dict, validate_quant_config
from qspeech.quant.targets import select_targets

log = logging.getLogger(__name__)
SAMPLE_RATE = 16_000
CACHE_VERSION = 1


# ----------------------------------------------------------------------------------- audio


def read_audio(path: str) -> torch.Tensor:
    """Mono float32 16 kHz waveform (1-D), read by the data layer (DataError on unreadable files)."""
    from qspeech.data import read_audio as _read

    return torch.from_numpy(np.ascontiguousarray(_read(path), dtype=np.float32))


class _AudioSampler:
    """Deterministic batches: step k of stage i always draws the same utterances and crops (resume-safe)."""

    def __init__(self, paths: list[str], batch_size: int, max_seconds: float, seed: int, keep: int = 512):
        self.paths, self.bs, self.seed = list(paths), int(batch_size), int(seed)
        self.max_len = int(max_seconds * SAMPLE_RATE)
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.keep = keep

    def _load(self, path):
        if path in self.cache:
            self.cache.move_to_end(path)
            return self.cache[path]
        wav = read_audio(path)
        if wav.numel() < 400:
            raise DataError(f"audio '{path}' is shorter than 25 ms; remove it from the distillation audio")
        self.cache[path] = wav
        if len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return wav

    def batch(self, stage: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, stage, step])
        idx = rng.choice(len(self.paths), self.bs, replace=len(self.paths) < self.bs)
        wavs = []
        for i in idx:
            w = self._load(self.paths[int(i)])
            if w.numel() > self.max_len:
                start = int(rng.integers(0, w.numel() - self.max_len + 1))
                w = w[start:start + self.max_len]
            wavs.append(w)
        from qspeech.features import pad_waves

        return pad_waves(wavs)


# ----------------------------------------------------------------------------------- losses


def distill_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], lengths: torch.Tensor,
                 kind: str = "l1_cos", cos_weight: float = 1.0) -> torch.Tensor:
    """Mean over layers of the per-frame loss over valid frames: L1 - cos_weight*log sigmoid(cos)
    (DistilHuBERT) or MSE (BiT)."""
    frames = student[0].shape[1]
    mask = (torch.arange(frames)[None, :] < lengths.to("cpu")[:, None]).to(student[0].device)
    m = mask.float()
    denom = m.sum().clamp_min(1)
    total = 0.0
    for s, t in zip(student, teacher):
        if kind == "mse":
            per = (s - t).pow(2).mean(-1)
        else:
            per = (s - t).abs().mean(-1) - cos_weight * F.logsigmoid(F.cosine_similarity(s, t, dim=-1))
        total = total + (per * m).sum() / denom
    return total / len(student)


@torch.no_grad()
def hidden_state_error(student, teacher, wavs, lens) -> float:
    """Mean over hidden states of ||s - t||^2 / ||t||^2 on valid frames (for reports and tests)."""
    s, t = student(wavs, lens), teacher(wavs, lens)
    mask = (torch.arange(s.hidden_states[0].shape[1])[None, :] < s.lengths[:, None]).unsqueeze(-1).float()
    errs = [((a - b).pow(2) * mask).sum() / (b.pow(2) * mask).sum().clamp_min(1e-12)
            for a, b in zip(s.hidden_states, t.hidden_states)]
    return float(torch.stack(errs).mean())


# ----------------------------------------------------------------------------------- cache keys


def _audio_signature(paths) -> list:
    sig = []
    for p in paths:
        try:
            sig.append([str(p), os.path.getsize(p)])
        except OSError:
            sig.append([str(p), None])
    return sig


def quant_cache_key(upstream, cfg: QuantConfig, bits: int, audio_paths) -> str:
    from qspeech.upstream import fingerprint

    payload = json.dumps({"v": CACHE_VERSION, "upstream": fingerprint(upstream), "quant": cache_dict(cfg),
                          "bits": int(bits), "audio": _audio_signature(audio_paths or [])},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]




def clone_upstream(upstream):
    """deepcopy that also works with the hook-based weight_norm (whose cached .weight is not a leaf)."""
    from torch.nn.utils.weight_norm import WeightNorm

    with torch.no_grad():
        for m in upstream.modules():
            for hook in m._forward_pre_hooks.values():
                if isinstance(hook, WeightNorm):
                    setattr(m, hook.name, hook.compute_weight(m))
    return copy.deepcopy(upstream)


def _freeze(upstream):
    upstream.eval()
    upstream.requires_grad_(False)
    upstream.cnn_grad = False
    return upstream


# ----------------------------------------------------------------------------------- distillation


def _distill_stage(student, teacher, sampler: _AudioSampler, cfg: QuantConfig, stage: int, bits: int,
                   key: str, ckpt: Path | None, progress: bool) -> dict:
    from tqdm.auto import tqdm

    student.eval()  # no dropout: deterministic and better for short runs; gradients still flow
    student.requires_grad_(True)
    student.cnn_grad = any(n.startswith("feature_extractor.") for n in
                           select_targets(student.model, bits, cfg.targets, cfg.exclude, cfg.overrides))
    teacher.eval()
    teacher.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    start, losses = 0, []
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state.get("key") == key and state.get("stage") == stage:
            student.model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            start, losses = int(state["step"]), list(state["losses"])
            log.info("resuming distillation stage %d at step %d from %s", stage, start, ckpt)

    def save(step):
        if ckpt is not None:
            torch_save_atomic({"key": key, "stage": stage, "bits": bits, "step": step, "model": student.model.state_dict(),
                          "optim": opt.state_dict(), "losses": losses}, ckpt)

    steps = int(cfg.steps)
    t0 = time.time()
    bar = tqdm(total=steps, initial=start, disable=not progress, desc=f"distill {cfg.method} {bits}-bit", leave=False)
    for step in range(start, steps):
        wavs, lens = sampler.batch(stage, step)
        with torch.no_grad():
            t = teacher(wavs, lens)
        s = student(wavs, lens)
        loss = distill_loss(s.hidden_states, t.hidden_states, s.lengths, cfg.distill_loss, cfg.cos_weight)
        if not torch.isfinite(loss):
            raise TrainingError(f"quantization-aware distillation diverged at step {step} (loss {loss.item()}); "
                                "lower quant.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip and cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, float(cfg.grad_clip))
        opt.step()
        losses.append(loss.item())
        bar.update(1)
        if (step + 1) % max(1, int(cfg.log_every)) == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-int(cfg.log_every):]):.4f}")
            log.info("distill %s %d-bit step %d/%d loss %.4f", cfg.method, bits, step + 1, steps, losses[-1])
        if ckpt is not None and cfg.ckpt_every and (step + 1) % int(cfg.ckpt_every) == 0 and step + 1 < steps:
            save(step + 1)
    bar.close()
    if start < steps:
        save(steps)
    _freeze(student)
    return {"stage": stage, "bits": bits, "steps": steps, "resumed_at": start, "seconds": round(time.time() - t0, 2),
            "loss_first": losses[0] if losses else None, "loss_last": float(np.mean(losses[-10:])) if losses else None}


def distill_stages(cfg: QuantConfig, bits: int) -> list[int]:
    """Bits of each distillation stage: BiT at 1 bit goes FP -> 2-bit -> 1-bit."""
    if cfg.method == "bit" and bits == 1 and cfg.multi_distill:
        return [2, 1]
    return [bits]


def prepare_quantized_upstream(upstream, cfg, bits: int, audio_paths: list[str] | None = None,
                               cache_dir=None, run_dir=None, progress: bool = True):
    """Quantize `upstream` in place for (cfg, bits) and return it frozen (eval, no grad).

    PTQ (rtn, kmeans): quantize_. QAT (lsq, bit): distil hidden states of a full-precision copy into the
    quantized model on `audio_paths` for quant.steps Adam steps (checkpoints and resume under
    run_dir/quant_ckpt), cached under cache_dir/quant keyed by (upstream fingerprint, quant config, bits,
    audio list). Writes run_dir/quant_distill.json with the stages' losses and timing.
    """
    cfg = validate_quant_config(cfg, bits, model=upstream.model)
    bits = int(bits)
    chosen = select_targets(upstream.model, bits, cfg.targets, cfg.exclude, cfg.overrides)
    if not chosen:
        return _freeze(upstream)
    if cfg.method in PTQ_METHODS or int(cfg.steps) == 0:
        return _freeze(quantize_(upstream, cfg, bits))
    if not audio_paths:
        raise ConfigError(f"quant.method={cfg.method} distils the quantized upstream on unlabeled audio, but no audio "
                          "was given; provide the data set, or set quant.steps=0 for the untrained quantizer")
    audio_paths = [str(p) for p in audio_paths]
    key = quant_cache_key(upstream, cfg, bits, audio_paths)
    cache_file = (Path(cache_dir) / "quant" / f"{upstream.spec.name}_{cfg.method}_b{bits}_{key}.pt") if cache_dir else None
    run_dir = Path(run_dir) if run_dir else None
    info = {"key": key, "method": cfg.method, "bits": bits, "cache": str(cache_file) if cache_file else None}

    if cache_file is not None and cache_file.exists():
        state = torch.load(cache_file, map_location="cpu", weights_only=True)
        quantize_(upstream, cfg, bits)
        upstream.model.load_state_dict(state["model"])
        info.update(state.get("info", {}), from_cache=True)
        log.info("loaded distilled %s %d-bit upstream from %s", cfg.method, bits, cache_file)
        _write_info(run_dir, info)
        return _freeze(upstream)

    sampler = _AudioSampler(audio_paths, cfg.batch_size, cfg.max_seconds, cfg.seed)
    torch.manual_seed(int(cfg.seed))
    teacher = _freeze(clone_upstream(upstream))
    previous = None
    stages = []
    t0 = time.time()
    for i, b in enumerate(distill_stages(cfg, bits)):
        if previous is None:
            student = clone_upstream(upstream)
        else:  # the next student starts from the previous student's latent weights
            student = clone_upstream(previous)
            remove_quantization_(student.model, keep="latent")
        quantize_(student, cfg, b)
        ckpt = run_dir / "quant_ckpt" / f"stage{i}_b{b}.pt" if run_dir else None
        stages.append(_distill_stage(student, teacher, sampler, cfg, i, b, key, ckpt, progress))
        teacher, previous = student, student
    quantize_(upstream, cfg, bits)
    upstream.model.load_state_dict(previous.model.state_dict())
    info.update(stages=stages, seconds=round(time.time() - t0, 2), from_cache=False)
    if cache_file is not None:
        torch_save_atomic({"model": upstream.model.state_dict(), "info": info}, cache_file)
    _write_info(run_dir, info)
    return _freeze(upstream)


def _write_info(run_dir: Path | None, info: dict) -> None:
    if run_dir is not None:
        write_json_atomic(run_dir / "quant_distill.json", info)
