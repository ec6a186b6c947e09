"""Quantizing a run's upstream: quantize_upstream / prepare_quantized_upstream quantize it in place, directly
(PTQ: rtn, kmeans) or by layer-wise distillation of a full-precision copy's hidden states into the quantized
model (QAT: DistilHuBERT's L1 + log-sigmoid cosine, or BiT's MSE) on unlabeled audio, trained on the one loop
(qspeech.loop: checkpoints, resume), with a cache of distilled upstreams.

The math lives in the quantization core (qspeech.quant); this module adds the audio, the teacher, the
stages, the cache and the run folder's records.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from qspeech.atomic import build_lock, torch_save_atomic, write_json_atomic
from qspeech.data import load_split, read_audio
from qspeech.errors import ConfigError, DataError
from qspeech.feature_cache import pad_waves
from qspeech.identity import identity_dict
from qspeech.loop import Job, LoopConfig, Step, run
from qspeech.quant import clone_model, get_method, quantize_, remove_quantization_, validate_quant_config
from qspeech.quant.config import DistillConfig, QuantConfig
from qspeech.quant.targets import select_targets
from qspeech.train import autocast_ctx, resolve_device
from qspeech.upstream import fingerprint

log = logging.getLogger(__name__)
SAMPLE_RATE = 16_000
CACHE_VERSION = 1


class Placement(NamedTuple):
    """Where distillation runs: the run's device (teacher, student and batches) and its autocast."""

    device: torch.device = torch.device("cpu")
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def run_placement(train_cfg) -> Placement:
    """The placement of a run's training config: train.device resolved (CUDA when present), train.amp."""
    device = resolve_device(train_cfg)
    return Placement(device, lambda: autocast_ctx(train_cfg, device))


# ----------------------------------------------------------------------------------- audio


class _AudioSampler:
    """Deterministic batches: step k of stage i always draws the same utterances and crops (resume-safe). An
    unreadable or too short file is skipped (once reported, listed in `skipped`) and another one drawn in its
    place from the same stream, so the batches stay a function of (stage, step)."""

    def __init__(self, paths: list[str], batch_size: int, max_seconds: float, seed: int, keep: int = 512):
        self.paths, self.bs, self.seed = list(paths), int(batch_size), int(seed)
        self.max_len = int(max_seconds * SAMPLE_RATE)
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.keep = keep
        self.skipped: dict[str, str] = {}  # path -> why

    def _load(self, path) -> torch.Tensor | None:
        if path in self.cache:
            self.cache.move_to_end(path)
            return self.cache[path]
        if path in self.skipped:
            return None
        try:
            wav = torch.from_numpy(np.ascontiguousarray(read_audio(path), dtype=np.float32))
            if wav.numel() < 400:
                raise DataError(f"audio '{path}' is shorter than 25 ms")
        except DataError as e:
            self.skipped[path] = str(e)
            log.warning("distillation: skipping unreadable audio %s: %s (%d skipped so far)", path, e,
                        len(self.skipped))
            if len(self.skipped) == len(self.paths):
                raise DataError(f"none of the {len(self.paths)} distillation audio files can be read "
                                f"(first: {next(iter(self.skipped.values()))})") from None
            return None
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
            while w is None:  # the same stream draws its replacement
                w = self._load(self.paths[int(rng.integers(0, len(self.paths)))])
            if w.numel() > self.max_len:
                start = int(rng.integers(0, w.numel() - self.max_len + 1))
                w = w[start:start + self.max_len]
            wavs.append(w)
        return pad_waves(wavs)


# ----------------------------------------------------------------------------------- losses


def layer_distill_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], lengths: torch.Tensor,
                       kind: str = "l1_cos", cos_weight: float = 1.0) -> torch.Tensor:
    """Mean over layers of the per-frame loss over valid frames: L1 - cos_weight*log sigmoid(cos)
    (DistilHuBERT) or MSE (BiT)."""
    frames = student[0].shape[1]
    mask = (torch.arange(frames)[None, :] < lengths.to("cpu")[:, None]).to(student[0].device)
    m = mask.float()
    denom = m.sum().clamp_min(1)
    total = 0.0
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()  # under bf16 autocast the hidden states come in bf16
        if kind == "mse":
            per = (s - t).pow(2).mean(-1)
        else:
            per = (s - t).abs().mean(-1) - cos_weight * F.logsigmoid(F.cosine_similarity(s, t, dim=-1))
        total = total + (per * m).sum() / denom
    return total / len(student)


# ----------------------------------------------------------------------------------- cache keys


def _audio_signature(paths) -> list:
    sig = []
    for p in paths:
        try:
            sig.append([str(p), os.path.getsize(p)])
        except OSError:
            sig.append([str(p), None])
    return sig


def distill_source(upstream, audio_paths) -> dict:
    """What every distilled student of one run starts from: the full-precision upstream's fingerprint and
    the audio list (computed once per run: hashing Base's weights and stat-ing the audio are not free)."""
    return {"upstream": fingerprint(upstream), "audio": _audio_signature(audio_paths or [])}


def quant_cache_key(source: dict, cfg: QuantConfig, bits: int, after: str | None = None) -> str:
    """The key of a distilled upstream: `source` (distill_source) distilled at `bits` with `cfg`; `after`:
    the key of the stage that taught it (a chain's later stage), None for a first stage or a run."""
    fields = {"v": CACHE_VERSION, **source, "quant": identity_dict(cfg), "bits": int(bits)}
    if after is not None:
        fields["after"] = after
    payload = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _cache_file(cache_dir, upstream, method: str, bits: int, key: str) -> Path | None:
    return Path(cache_dir) / "quant" / f"{upstream.spec.name}_{method}_b{bits}_{key}.pt" if cache_dir else None


@contextlib.contextmanager
def _cache_lock(cache_file: Path | None):
    """Held while one process distils what cache_file will hold: a sweep's parallel runs that need the same
    student (e.g. `bits=2,1` with bit: the 1-bit chain's first stage is the 2-bit run) wait for it instead of
    training it twice."""
    if cache_file is None:
        yield
        return
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(str(cache_file) + ".lock"):
        yield


def _freeze(upstream):
    upstream.eval()
    upstream.requires_grad_(False)
    upstream.cnn_grad = False
    return upstream


# ----------------------------------------------------------------------------------- distillation


class DistillStage(Job):
    """One QAT stage as the loop's job: the quantized student learns the (frozen) teacher's hidden states on
    the sampler's batches. The student stays in eval mode (no dropout: deterministic, and better for short
    runs; gradients still flow); its CNN trains when some of its modules are quantized."""

    def __init__(self, student, teacher, sampler: _AudioSampler, cfg: DistillConfig, stage: int, bits: int, key: str,
                 placement: Placement = Placement()):
        self.student, self.teacher, self.sampler, self.cfg = student, teacher, sampler, cfg
        self.placement = placement
        self.stage, self.bits, self.key, self.losses = stage, bits, key, []
        student.eval()
        student.requires_grad_(True)
        student.cnn_grad = any(n.startswith("feature_extractor.") for n in
                               select_targets(student.model, bits, cfg.targets, cfg.exclude, cfg.overrides))
        teacher.eval()
        teacher.requires_grad_(False)
        self.model = student.model
        params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))

    def step(self, index: int) -> Step:
        wavs, lens = self.sampler.batch(self.stage, index)
        device = self.placement.device
        wavs, lens = wavs.to(device, non_blocking=True), lens.to(device)
        with self.placement.autocast():
            with torch.no_grad():
                t = self.teacher(wavs, lens)
            s = self.student(wavs, lens)
        loss = layer_distill_loss(s.hidden_states, t.hidden_states, s.lengths, self.cfg.distill_loss,
                                  self.cfg.cos_weight)
        self.losses.append(loss.item())
        return Step(loss)

    def log(self, step: int, averages: dict[str, float], lr: float, wall_s: float) -> dict:
        return {"loss": f"{averages['loss']:.4f}"}

    def state(self) -> dict:
        return {"key": self.key, "stage": self.stage, "bits": self.bits, "losses": self.losses}

    def accepts(self, state: dict) -> bool:
        return state.get("key") == self.key and state.get("stage") == self.stage

    def load(self, state: dict) -> None:
        self.losses = list(state["losses"])
        log.info("resuming distillation stage %d at step %d", self.stage, state["step"])


def _distill_stage(student, teacher, sampler: _AudioSampler, cfg: DistillConfig, stage: int, bits: int,
                   key: str, ckpt: Path | None, progress: bool, label: str | None = None,
                   placement: Placement = Placement()) -> dict:
    """Train one stage (resuming from `ckpt` when it holds this stage's state); the student ends frozen.
    label: the stage's name in progress bars and logged curves (default '<bits>bit')."""
    label = label or f"{bits}bit"
    job = DistillStage(student, teacher, sampler, cfg, stage, bits, key, placement)
    t0 = time.time()
    res = run(job, LoopConfig(
        total=int(cfg.steps), desc=f"distill {cfg.method} {label.replace('bit', '-bit', 1)}", grad_clip=cfg.grad_clip,
        log_every=max(1, int(cfg.log_every)), ckpt_every=int(cfg.ckpt_every or 0) or None, state_path=ckpt,
        progress=progress, hint="lower quant.lr", log_prefix=f"qat_{label}"))
    _freeze(student)
    losses = job.losses
    return {"stage": stage, "bits": bits, "steps": int(cfg.steps), "resumed_at": res.resumed_from,
            "seconds": round(time.time() - t0, 2), "loss_first": losses[0] if losses else None,
            "loss_last": float(np.mean(losses[-10:])) if losses else None}


def prepare_quantized_upstream(upstream, cfg, bits: int, audio_paths: list[str] | None = None,
                               cache_dir=None, run_dir=None, progress: bool = True, placement: Placement = Placement()):
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
    if not get_method(cfg.method).needs_distillation or int(cfg.steps) == 0:
        return _freeze(quantize_(upstream, cfg, bits))
    if not audio_paths:
        raise ConfigError(f"quant.method={cfg.method} distils the quantized upstream on unlabeled audio, but no audio "
                          "was given; provide the data set, or set quant.steps=0 for the untrained quantizer")
    audio_paths = [str(p) for p in audio_paths]
    source = distill_source(upstream, audio_paths)
    key = quant_cache_key(source, cfg, bits)
    cache_file = _cache_file(cache_dir, upstream, cfg.method, bits, key)
    run_dir = Path(run_dir) if run_dir else None
    info = {"key": key, "method": cfg.method, "bits": bits, "cache": str(cache_file) if cache_file else None}
    with _cache_lock(cache_file):
        if cache_file is not None and cache_file.exists():
            state = torch.load(cache_file, map_location="cpu", weights_only=True)
            quantize_(upstream, cfg, bits)
            upstream.model.load_state_dict(state["model"])
            info.update(state.get("info", {}), cache=str(cache_file), from_cache=True)
            log.info("loaded distilled %s %d-bit upstream from %s", cfg.method, bits, cache_file)
            _write_info(run_dir, info)
            return _freeze(upstream)

        t0 = time.time()
        student = _distill(upstream, cfg, bits, audio_paths, key, run_dir, progress, info, cache_dir, source,
                           placement)
        quantize_(upstream, cfg, bits)
        upstream.model.load_state_dict(student.model.state_dict())
        info.update(seconds=round(time.time() - t0, 2), from_cache=False)
        if cache_file is not None:
            torch_save_atomic({"model": upstream.model.state_dict(), "info": info}, cache_file)
    _write_info(run_dir, info)
    return _freeze(upstream)


def quantize_upstream(cfg, upstream, run_dir=None, progress: bool = True):
    """The upstream quantized as the run config says (cfg.quant at cfg.bits); a method that needs audio (QAT)
    distils on the training split of quant_audio (the head's data when null), on the run's device under its
    autocast. Shared by `qspeech run` and `export`."""
    audio = None
    if int(cfg.bits) < 32 and get_method(cfg.quant.method).needs_audio:
        audio = [u.path for u in load_split(cfg.quant_audio or cfg.data, "train", cfg.cache_dir)]
    return prepare_quantized_upstream(upstream, cfg.quant, int(cfg.bits), audio, cfg.cache_dir,
                                      run_dir=run_dir, progress=progress, placement=run_placement(cfg.train))


def _distill(upstream, cfg: DistillConfig, bits: int, audio_paths: list[str], key: str, run_dir: Path | None,
             progress: bool, info: dict, cache_dir, source: dict, placement: Placement):
    """The method's distillation stages (bit at 1 bit: FP -> 2-bit -> 1-bit; bit_exact: W1A4 -> W1A2 -> W1A1),
    each stage's teacher the previous stage's student; returns the last student and records the stages in
    info["stages"]. A stage before the last is cached under cache_dir by its chain: the 1-bit chain's 2-bit
    stage is the 2-bit run's student (same key, same file), so a sweep over bits distils it once. Teacher,
    students and batches live on placement.device; the upstream itself stays where it is."""
    sampler = _AudioSampler(audio_paths, cfg.batch_size, cfg.max_seconds, cfg.seed)
    method = get_method(cfg.method)
    plan = method.distill_plan(cfg, bits)
    teacher = _freeze(clone_model(upstream).to(placement.device))
    previous, stage_key = None, None
    info["stages"] = []
    for i, (b, stage_cfg) in enumerate(plan):
        # seeded per stage, so that a stage trains alike whether its predecessor was trained or loaded
        torch.manual_seed(int(cfg.seed) + i)
        if previous is None or method.stage_start == "full_precision":
            student = clone_model(upstream)
        else:  # the next student starts from the previous student's latent weights
            student = clone_model(previous)
            remove_quantization_(student.model, keep="latent")
        quantize_(student, stage_cfg, b).to(placement.device)
        # a stage that differs from the run's config in more than its bits names its activation bits too
        act = f"_a{stage_cfg.act_bits}" if stage_cfg is not cfg else ""
        ckpt = run_dir / "quant_ckpt" / f"stage{i}_b{b}{act}.pt" if run_dir else None
        stage_key = quant_cache_key(source, stage_cfg, b, after=stage_key)
        shared = _cache_file(cache_dir, upstream, cfg.method, b, stage_key) if i < len(plan) - 1 else None
        with _cache_lock(shared):
            if shared is not None and shared.exists():
                state = torch.load(shared, map_location="cpu", weights_only=True)
                student.model.load_state_dict(state["model"])
                _freeze(student)
                # the losses and time of the run that distilled it
                made = {k: v for k, v in (state.get("info", {}).get("stages") or [{}])[-1].items() if k != "resumed_at"}
                record = {**made, "stage": i, "bits": b, "steps": int(stage_cfg.steps), "from_cache": str(shared)}
                log.info("stage %d (%d-bit): loaded the distilled student from %s", i, b, shared)
            else:
                record = _distill_stage(student, teacher, sampler, stage_cfg, i, b, key, ckpt, progress,
                                        f"{b}bit{act}", placement)
                if shared is not None:
                    torch_save_atomic({"model": _cpu(student.model.state_dict()),
                                       "info": {"key": stage_key, "method": cfg.method, "bits": b,
                                                "stages": [{**record, "stage": 0}], "seconds": record["seconds"],
                                                "from_cache": False}}, shared)
        if stage_cfg.act_bits is not None:
            record["act_bits"] = int(stage_cfg.act_bits)
        info["stages"].append(record)
        teacher, previous = student, student
    info["skipped_audio"] = sorted(sampler.skipped)
    return previous


def _cpu(state: dict) -> dict:
    """A state dict with CPU tensors (the cache is device-independent; a no-op for a CPU model)."""
    return {k: v.cpu() for k, v in state.items()}


def _write_info(run_dir: Path | None, info: dict) -> None:
    if run_dir is not None:
        write_json_atomic(run_dir / "quant_distill.json", info)
