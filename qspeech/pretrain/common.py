"""What HuBERT pretraining and DistilHuBERT distillation share: the unlabeled corpus and its crops, the
optimizer and its schedule on the one training loop (qspeech.loop), run folders, the loss log, fp16
checkpoints."""

from __future__ import annotations

import dataclasses
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from qspeech.atomic import torch_save_atomic, write_json_atomic, write_text_atomic
from qspeech.config import output_dir
from qspeech.data import load_split, read_audio
from qspeech.errors import DataError, TrainingError
from qspeech.loggers.csv_file import append_csv, read_csv, write_csv
from qspeech.loop import Job, LoopConfig, Step, linear_warmup_decay, run
from qspeech.pretrain import cards
from qspeech.pretrain.config import OptimConfig
from qspeech.seeding import seed_everything
from qspeech.upstream import Upstream, UpstreamSpec, build_upstream
from qspeech.upstream.builders import build_from_state
from qspeech.upstream.config import ModelConfig

SAMPLE_RATE = 16_000
REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------- corpus
@dataclass
class Clip:
    utt_id: str
    path: str
    num_samples: int


class Corpus:
    """The unlabeled pretraining audio, held in memory as int16 (a few hundred MB at most)."""

    def __init__(self, clips: list[Clip], description: str):
        self.clips = clips
        self.description = description
        self.audio: list[np.ndarray] = []
        for c in clips:
            wav = read_audio(c.path)
            self.audio.append((np.clip(wav, -1.0, 1.0) * 32767.0).round().astype(np.int16))
            c.num_samples = len(wav)
        self.lengths = np.array([len(a) for a in self.audio])

    def __len__(self) -> int:
        return len(self.clips)

    def subset(self, idx) -> "Corpus":
        """A view on some utterances (the audio is shared)."""
        c = Corpus.__new__(Corpus)
        c.clips, c.audio = [self.clips[i] for i in idx], [self.audio[i] for i in idx]
        c.lengths, c.description = self.lengths[list(idx)], f"{self.description} (subset of {len(idx)})"
        return c

    def wav(self, i: int) -> np.ndarray:
        return self.audio[i].astype(np.float32) / 32767.0

    @property
    def hours(self) -> float:
        return float(self.lengths.sum()) / SAMPLE_RATE / 3600


def load_corpus(cfg, pcfg, min_samples: int) -> Corpus:
    """pcfg.audio_dir (all *.wav / *.flac under it) if set, else the data config's pcfg.split (cfg: the typed
    pretrain / distill config, pcfg: its recipe section)."""
    if pcfg.audio_dir:
        root = Path(str(pcfg.audio_dir)).expanduser()
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".wav", ".flac"))
        if not paths:
            raise DataError(f"audio_dir={root}: no .wav or .flac files")
        clips = [Clip(p.stem, str(p), 0) for p in paths]
        desc = f"audio_dir {root}"
    else:
        utts = load_split(cfg.data, str(pcfg.split), str(cfg.cache_dir))
        clips = [Clip(u.utt_id, str(u.path), int(round(float(u.duration_s) * SAMPLE_RATE))) for u in utts]
        desc = f"data={cfg.data.name} split={pcfg.split}"
        split_dir = next((q for q in Path(clips[0].path).parents if q.name == str(pcfg.split)), None) if clips else None
        if split_dir is not None:  # the corpus folder names the corpus settings (e.g. mini-<hash>)
            desc += f", corpus {split_dir.parent.name}"
    max_utts = pcfg.max_utts
    if max_utts and len(clips) > int(max_utts):
        keep = sorted(np.random.default_rng(int(cfg.seed)).choice(len(clips), int(max_utts), replace=False))
        clips = [clips[i] for i in keep]
    corpus = Corpus(clips, desc)
    keep = [i for i, n in enumerate(corpus.lengths) if n >= min_samples]
    if not keep:
        raise DataError(f"{desc}: no utterance is at least {min_samples / SAMPLE_RATE:.2f} s long")
    if len(keep) < len(corpus):
        corpus.clips = [corpus.clips[i] for i in keep]
        corpus.audio = [corpus.audio[i] for i in keep]
        corpus.lengths = corpus.lengths[keep]
    return corpus


class CropBatches:
    """Deterministic batches of random crops: batch `step` depends only on (seed, step), so a resumed run
    sees the same data. Each epoch sorts utterances by (jittered) length, cuts them into batches of
    neighbours and shuffles the batches; a batch is cropped to min(crop, its shortest utterance), with
    crop starts on multiples of `hop` so frame t of a crop is frame start/hop + t of the utterance."""

    def __init__(self, lengths: np.ndarray, batch_size: int, crop: int, hop: int, seed: int):
        self.lengths, self.batch_size, self.crop, self.hop, self.seed = lengths, batch_size, crop, hop, seed
        self.per_epoch = max(1, len(lengths) // batch_size)
        self._epoch, self._batches = -1, []

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = np.argsort(self.lengths * rng.uniform(0.85, 1.15, len(self.lengths)), kind="stable")
        if len(order) >= self.batch_size:
            order = order[: self.per_epoch * self.batch_size]
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __call__(self, step: int) -> tuple[np.ndarray, int, np.ndarray]:
        """(utterance indices, crop length in samples, crop starts in samples) of batch `step`."""
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        idx = self._batches[pos]
        length = int(min(self.crop, self.lengths[idx].min()))
        rng = np.random.default_rng([self.seed, 1_000_003, step])
        starts = np.array([self.hop * rng.integers(0, (self.lengths[i] - length) // self.hop + 1) for i in idx])
        return idx, length, starts

    def waves(self, corpus: Corpus, step: int) -> tuple[torch.Tensor, np.ndarray, int, np.ndarray]:
        idx, length, starts = self(step)
        wavs = np.stack([corpus.audio[i][s : s + length] for i, s in zip(idx, starts)]).astype(np.float32) / 32767.0
        return torch.from_numpy(wavs), idx, length, starts


# ---------------------------------------------------------------------------------------------- training
def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(int(n))
    torch.set_flush_denormal(True)


def make_optimizer(model: torch.nn.Module, ocfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=float(ocfg.lr), betas=tuple(ocfg.betas), eps=float(ocfg.eps), weight_decay=float(ocfg.weight_decay)
    )


def warmup_steps(ocfg: OptimConfig, total: int) -> int:
    w = float(ocfg.warmup)
    return max(1, int(round(w * total)) if w < 1 else int(w))


class LossLog:
    """loss.csv in the run folder; on resume rows after the resumed step are dropped."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = path, fields

    def truncate(self, stage: str, step: int) -> None:
        if self.path.exists():
            write_csv(self.path, self.fields, [r for r in read_csv(self.path)
                                               if not (r["stage"] == stage and int(r["step"]) > step)])

    def append(self, row: dict) -> None:
        append_csv(self.path, self.fields, [row])

    def rows(self) -> list[dict]:
        return read_csv(self.path)

    def plot(self, png: Path, keys: list[str], title: str) -> Path | None:
        """Loss curve png (per stage); None when matplotlib is missing."""
        try:  # slow to import: only when a plot is drawn
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = self.rows()
        if not rows:
            return None
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for stage in dict.fromkeys(r["stage"] for r in rows):
                pts = [(int(r["global_step"]), float(r[key])) for r in rows if r["stage"] == stage and r.get(key)]
                if pts:
                    ax.plot(*zip(*pts), label=stage)
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)
        return png


# ------------------------------------------------------------------------------------------- run folders
def run_dir(cfg, kind: str) -> Path:
    """cfg.run_dir if set (pass an old run's folder to resume it), else Hydra's output folder, else
    outputs/<kind>/<timestamp>."""
    given = Path(str(cfg.run_dir)).expanduser() if cfg.run_dir else None
    return output_dir(given, default=REPO_ROOT / "outputs" / kind / time.strftime("%Y-%m-%d/%H-%M-%S"))


def start_run(cfg, kind: str) -> tuple[Path, float]:
    """Threads, seeds, the run folder with its config.yaml: what every pretraining command starts with."""
    set_threads(cfg.threads)
    seed_everything(int(cfg.seed))
    run = run_dir(cfg, kind)
    save_config(cfg, run / "config.yaml")
    print(f"[{kind}] run folder {run}", flush=True)
    return run, time.time()


def save_config(cfg, path: Path) -> None:
    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))


def finish_run(cfg, kind: str, run: Path, summary: dict, card: str, checkpoint: Path) -> dict:
    """summary.json and the model card in the run folder; with cfg.install, both installed into
    qspeech/assets/. What every pretraining command ends with."""
    write_json_atomic(run / "summary.json", summary)
    card_path = run / f"{cfg.model.name}.md"
    write_text_atomic(card_path, card)
    if cfg.install:
        summary["installed"] = [str(x) for x in cards.install(checkpoint, card_path, str(cfg.model.asset))]
        write_json_atomic(run / "summary.json", summary)
    print(f"[{kind}] done in {summary['wall_s'] / 60:.1f} min: {checkpoint} "
          f"({checkpoint.stat().st_size / 1e6:.1f} MB)", flush=True)
    return summary


def half_state(state):
    """A checkpoint dict with every floating tensor stored as fp16 (load_state_dict casts back to fp32)."""
    if isinstance(state, dict):
        return {k: half_state(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor) and state.is_floating_point():
        return state.detach().to(torch.float16).clone()
    return state


def round_to_half_(model: torch.nn.Module) -> None:
    """Round a model's floating weights to fp16 values in place (kept as fp32 tensors)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(torch.float16).to(t.dtype))


def save_s3prl(state: dict, path: Path, fp16: bool) -> Path:
    return torch_save_atomic(half_state(state) if fp16 else state, path)


def command_line(kind: str, overrides: list[str] | None = None) -> str:
    return " ".join(["qspeech", kind, *(overrides or [])])


def hydra_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return [o for o in HydraConfig.get().overrides.task if not o.startswith("command=")]
    except Exception:  # noqa: BLE001
        pass
    return []


def env_info() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


class PretrainJob(Job):
    """A pretraining step function as the loop's job: AdamW over the trainable parameters, numpy's global RNG
    seeded from (stage, step) before each step (HuBERT draws its masks from it), loss.csv rows."""

    def __init__(self, stage: str, model: torch.nn.Module, step_fn, ocfg, log: LossLog, global_offset: int,
                 total: int):
        self.stage, self.model, self.step_fn, self.loss_log = stage, model, step_fn, log
        self.optimizer = make_optimizer(model, ocfg)
        self.global_offset, self.total, self.first = global_offset, total, None
        self.tty = os.isatty(2)

    def step(self, index: int) -> Step:
        np.random.seed((zlib.crc32(self.stage.encode()) + 1_000_003 * index) % 2**32)  # masks: fixed by the step
        loss, metrics = self.step_fn(index)
        return Step(loss, metrics)

    def log(self, step: int, averages: dict[str, float], lr: float, wall_s: float) -> dict:
        self.first = self.first or averages
        self.loss_log.append({"stage": self.stage, "step": step, "global_step": self.global_offset + step,
                              "lr": f"{lr:.3e}", "wall_s": f"{wall_s:.1f}",
                              **{k: f"{v:.5g}" for k, v in averages.items()}})
        if not self.tty:
            print(f"[{self.stage}] step {step}/{self.total} " + " ".join(f"{k}={v:.4g}" for k, v in averages.items())
                  + f" lr={lr:.2e} {wall_s / 60:.1f} min", flush=True)
        return {k: f"{averages[k]:.3f}" for k in list(averages)[:3]}

    def state(self) -> dict:
        return {"first": self.first}

    def load(self, state: dict) -> None:
        self.first = state.get("first")
        self.loss_log.truncate(self.stage, int(state["step"]))
        print(f"[{self.stage}] resumed at step {state['step']}/{self.total}", flush=True)


def train_loop(stage: str, model: torch.nn.Module, step_fn, total: int, ocfg, state_path: Path, log: LossLog,
               log_every: int, ckpt_every: int, global_offset: int = 0, resume: bool = True, progress: bool = True,
               _stop_after: int | None = None) -> dict:
    """Train `model` with step_fn(step) -> (loss tensor, {metric: float}) on the one loop (qspeech.loop):
    AdamW, linear warmup + linear decay, gradient clipping, loss.csv every `log_every` steps, the resumable
    state every `ckpt_every` steps.

    Returns {"steps", "wall_s" (all invocations), "wall_this_s", "last": averaged metrics of the last log
    interval, "first": those of the first one}. _stop_after (tests): return after that many steps as if
    interrupted.
    """
    job = PretrainJob(stage, model, step_fn, ocfg, log, global_offset, total)
    warm = warmup_steps(ocfg, total)
    model.train()
    res = run(job, LoopConfig(
        total=total, desc=stage, schedule=lambda lr, step: linear_warmup_decay(lr, step, total, warm),
        grad_clip=float(ocfg.grad_clip), log_every=log_every, ckpt_every=ckpt_every, state_path=state_path,
        resume=resume, progress=progress, stop_after=_stop_after,
        hint="lower the learning rate (optim.lr) or raise the warmup, then rerun (the run resumes from its last "
             "checkpoint)"))
    last = res.last
    rows = [r for r in log.rows() if r["stage"] == stage]
    if rows and not last:
        last = {k: float(v) for k, v in rows[-1].items() if k not in ("stage", "step", "global_step", "lr", "wall_s") and v}
    return {"steps": total, "wall_s": res.wall_s, "wall_this_s": res.wall_this_s, "first": job.first, "last": last}


@torch.no_grad()
def verify_checkpoint(model_cfg: ModelConfig, fp32_state: dict, path: Path, arch: str, fp16: bool,
                      seconds: float = 1.5) -> dict:
    """Load `path` through build_upstream (model.ckpt=path) and compare its hidden states with those of the
    trained model (`fp32_state`, an s3prl checkpoint dict; rounded to fp16 when the file is fp16): they
    must be identical. Also reports how much fp16 storage moved them from the fp32 model's."""
    loaded = build_upstream(dataclasses.replace(model_cfg, ckpt=str(path), init="pretrained"))

    def ref(rounded: bool) -> Upstream:
        model, normalize = build_from_state(arch, half_state(fp32_state) if rounded else fp32_state)
        return Upstream(model, UpstreamSpec(model_cfg.name, arch, model_cfg.arch_cfg), normalize)

    g = torch.Generator().manual_seed(0)
    wav = torch.randn(2, int(seconds * SAMPLE_RATE), generator=g) * 0.1
    lens = torch.tensor([wav.shape[1], wav.shape[1] * 3 // 4])
    a, b = loaded(wav, lens), ref(fp16)(wav, lens)
    diff = max(float((x - y).abs().max()) for x, y in zip(a.hidden_states, b.hidden_states))
    if diff != 0.0 or not torch.equal(a.lengths, b.lengths):
        raise TrainingError(f"{path}: hidden states after reloading differ from the trained model's (max {diff})")
    exact = ref(False)(wav, lens)
    rel = max(float((x - y).norm() / y.norm().clamp_min(1e-12)) for x, y in zip(a.hidden_states, exact.hidden_states))
    return {"reload_max_abs_diff": diff, "fp16_vs_fp32_max_rel_diff": rel, "num_hidden": len(a.hidden_states)}
