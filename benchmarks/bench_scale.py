"""What the paper's study costs at full scale, measured on this machine and projected: the real `task=asr` recipe
(SUPERB's BiLSTM-CTC head) on HuBERT Base (random weights: speed does not depend on them) over a LibriSpeech-layout
corpus this script writes (noise audio, LibriSpeech-like lengths and transcripts).

1. Stages of one training step, timed apart on the same batches: audio (read + decode FLAC + pad), upstream
   (HuBERT Base forward, no grad), head (featurizer, SpecAugment, BiLSTMs, CTC: forward + backward) and optimizer
   (Adam step), per second of audio.
2. The recipe end to end through `qspeech run task=asr` with the feature cache on and off and DataLoader workers
   0 and 2: steps per second, the cache's bytes per hour of audio.
3. QAT: BiT-style 2-bit distillation steps of HuBERT Base (experiment=paper_asr's stage: batch 8 x 4 s crops,
   20k steps; 1 bit distils two such stages), timed on a smaller batch and scaled by audio seconds.
4. The projection: train-clean-100 (100.6 h) through SUPERB ASR's 200k steps of 32 utterances, for the rows of the
   paper's table (FP, 2-bit and 1-bit QAT HuBERT, DistilHuBERT), on this machine, and the feature cache's disk
   per row. GPU times are not projected from CPU timings: `make gpu-check` measures the GPU's stage times.

    python benchmarks/bench_scale.py [--hours 0.03] [--batch 4] [--steps 3] [--qat-steps 2] [--threads 2]
                                     [--out outputs/bench_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from qspeech.atomic import write_json_atomic
from qspeech.data import read_audio
from qspeech.feature_cache import estimate_bytes, pad_waves
from qspeech.tasks.asr import ASRConfig, ASRHead
from qspeech.tasks.vocab import make_vocab
from qspeech.upstream import build_upstream
from qspeech.upstream.config import ModelConfig

SR = 16_000
TRAIN_CLEAN_100_H = 100.6  # hours (28,539 utterances, mean 12.7 s)
DEV_TEST_H = 5.4 + 5.4  # dev-clean + test-clean
SUPERB_STEPS, SUPERB_BATCH = 200_000, 32
WORDS = "THE OF AND TO A IN THAT HE WAS IT HIS I WITH AS HAD FOR YOU HER BE AT NOT ON BY SHE WHICH".split()


def write_corpus(root: Path, hours: float, seed: int = 0) -> dict:
    """<root>/{train-clean-100,dev-clean,test-clean}/<spk>/<chapter>/<spk>-<chapter>-NNNN.flac + trans.txt; train
    gets `hours` of audio in 10-16 s utterances (LibriSpeech's train-clean-100 mean is 12.7 s), dev and test a few."""
    rng = np.random.default_rng(seed)
    made = {}
    for subset, seconds in (("train-clean-100", hours * 3600), ("dev-clean", 30.0), ("test-clean", 30.0)):
        total, n = 0.0, 0
        while total < seconds:
            spk, chap = 100 + n // 20, 1
            folder = root / subset / str(spk) / str(chap)
            folder.mkdir(parents=True, exist_ok=True)
            dur = float(rng.uniform(10.0, 16.0))
            utt = f"{spk}-{chap}-{n % 20:04d}"
            sf.write(folder / f"{utt}.flac", (0.05 * rng.standard_normal(int(dur * SR))).astype(np.float32), SR)
            text = " ".join(rng.choice(WORDS, size=int(dur * 2.7)))  # LibriSpeech reads ~2.7 words a second
            with open(folder / f"{spk}-{chap}.trans.txt", "a") as f:
                f.write(f"{utt} {text}\n")
            total, n = total + dur, n + 1
        made[subset] = {"utterances": n, "seconds": round(total, 1)}
    return made


def _timed(fn, sync=lambda: None):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def stage_times(root: Path, batch: int, steps: int, device: torch.device) -> dict:
    """Seconds per second of audio of each stage of a training step (steps batches of `batch` utterances)."""
    files = sorted((root / "train-clean-100").rglob("*.flac"))
    upstream = build_upstream(ModelConfig(name="hubert", init="random")).to(device).eval().requires_grad_(False)
    cfg = ASRConfig()
    vocab = make_vocab(cfg.vocab)
    head = ASRHead(upstream.num_hidden, upstream.hidden_size, len(vocab.symbols), cfg).to(device).train()
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    totals = {"audio": 0.0, "upstream": 0.0, "head": 0.0, "optimizer": 0.0}
    audio_s = 0.0
    for b in range(steps):
        chunk = [files[(b * batch + i) % len(files)] for i in range(batch)]
        (wavs, lens), t = _timed(lambda: pad_waves([read_audio(str(p)) for p in chunk]))
        totals["audio"] += t
        audio_s += float(lens.sum()) / SR
        out, t = _timed(lambda: upstream(wavs.to(device), lens.to(device)), sync)
        totals["upstream"] += t
        hs = torch.stack(out.hidden_states, dim=2)
        targets = torch.randint(1, len(vocab.symbols), (len(chunk), 60))

        def head_step():
            logits, flens = head(hs, out.lengths)
            logp = F.log_softmax(logits.float(), -1).transpose(0, 1)
            loss = F.ctc_loss(logp, targets.to(device), flens.to(device), torch.full((len(chunk),), 60, device=device),
                              zero_infinity=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        _, t = _timed(head_step, sync)
        totals["head"] += t
        _, t = _timed(opt.step, sync)
        totals["optimizer"] += t
    per_audio_s = {k: v / audio_s for k, v in totals.items()}
    feature_bytes_per_h = estimate_bytes(upstream, 3600.0)
    return {"audio_seconds": round(audio_s, 1), "seconds_per_audio_second": {k: round(v, 4) for k, v in per_audio_s.items()},
            "feature_bytes_per_audio_hour": feature_bytes_per_h}


def qat_step_time(root: Path, steps: int, batch: int, device: torch.device) -> dict:
    """Seconds per second of distilled audio of a BiT-style 2-bit QAT step on HuBERT Base (teacher forward,
    student forward and backward, the update)."""
    from qspeech.quant import quant_config
    from qspeech.quantize_upstream import Placement, prepare_quantized_upstream

    files = [str(p) for p in sorted((root / "train-clean-100").rglob("*.flac"))]
    cfg = quant_config("bit", steps=steps, batch_size=batch, max_seconds=4.0, targets=["linear", "cnn"])
    with tempfile.TemporaryDirectory() as run:
        up = build_upstream(ModelConfig(name="hubert", init="random"))
        prepare_quantized_upstream(up, cfg, 2, files, None, Path(run), progress=False, placement=Placement(device))
        stage = json.loads((Path(run) / "quant_distill.json").read_text())["stages"][0]
    return {"steps": steps, "batch": f"{batch} x 4 s", "seconds": stage["seconds"],
            "seconds_per_audio_second": round(stage["seconds"] / (steps * batch * 4.0), 4)}


def recipe_run(root: Path, work: Path, name: str, overrides: list[str], threads: int) -> dict:
    """`qspeech run task=asr model=hubert model.init=random ...` on the corpus; its result.json and cache size."""
    cache, out = work / f"cache-{name}", work / f"out-{name}"
    out.mkdir()
    env = {**os.environ, "QSPEECH_CACHE": str(cache)}
    cmd = [str(Path(sys.executable).parent / "qspeech"), "run", "task=asr", "model=hubert", "model.init=random",
           f"data.root={root}", "export=false", "train.device=cpu", f"train.num_threads={threads}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: qspeech run failed:\n{proc.stderr[-2000:]}")
    [res] = out.rglob("result.json")
    m = json.loads(res.read_text())["metrics"]
    feats = cache / "features"
    size = sum(p.stat().st_size for p in feats.rglob("*") if p.is_file()) if feats.exists() else 0
    return {"command": " ".join(cmd[1:]), "wall_s": round(wall, 1), "steps": m["steps"],
            "train_wall_s": m["train_wall_s"], "steps_per_s": round(m["steps"] / m["train_wall_s"], 4),
            "train_utts_per_s": m["train_utts_per_s"], "upstream_utts_per_s": m["upstream_utts_per_s"],
            "feature_cache": m["feature_cache"], "feature_cache_bytes": size}


QAT_STEPS, QAT_AUDIO_PER_STEP = 20_000, 8 * 4.0  # experiment=paper_asr's distillation stage
# The paper's ASR rows: (name, QAT stages, hidden states relative to HuBERT Base's 13: DistilHuBERT has 6 of 768)
ROWS = (("HuBERT Base FP", 0, 1.0), ("HuBERT Base 2-bit QAT", 1, 1.0), ("HuBERT Base 1-bit QAT (FP -> 2 -> 1)", 2, 1.0),
        ("DistilHuBERT", 0, 6 / 13))


def projection(stages: dict, qat: dict) -> dict:
    """The paper's ASR table at full scale on this machine (one process), and the feature cache's disk per row.
    DistilHuBERT's upstream pass is taken as HuBERT's (an upper bound: it has 2 layers, not 12)."""
    per = stages["seconds_per_audio_second"]
    audio_per_step = SUPERB_BATCH * 12.7
    head_step = (per["head"] + per["optimizer"]) * audio_per_step
    extract = (TRAIN_CLEAN_100_H + DEV_TEST_H) * 3600 * (per["audio"] + per["upstream"])
    qat_stage = QAT_STEPS * QAT_AUDIO_PER_STEP * qat["seconds_per_audio_second"]
    cache_gb = stages["feature_bytes_per_audio_hour"] * (TRAIN_CLEAN_100_H + DEV_TEST_H) / 1e9
    rows = [{"row": name, "qat_days": round(n * qat_stage / 86400, 1),
             "head_days_cached": round((SUPERB_STEPS * head_step + extract) / 86400, 1),
             "head_days_live": round(SUPERB_STEPS * (head_step + (per["audio"] + per["upstream"]) * audio_per_step)
                                     / 86400, 1),
             "feature_cache_gb": round(cache_gb * share, 1)} for name, n, share in ROWS]
    return {"head_step_s": round(head_step, 2), "qat_stage_days": round(qat_stage / 86400, 1), "rows": rows,
            "feature_cache_gb_all_rows": round(sum(r["feature_cache_gb"] for r in rows), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=0.03, help="hours of training audio to synthesize")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--qat-steps", type=int, default=2, help="QAT distillation steps timed (batch 2 x 4 s)")
    ap.add_argument("--skip-runs", action="store_true", help="stage times only (no qspeech run)")
    ap.add_argument("--out", default="outputs/bench_scale.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="qspeech-scale-"))
    try:
        root = work / "LibriSpeech"
        corpus = write_corpus(root, args.hours)
        print(f"corpus: {corpus}")
        stages = stage_times(root, args.batch, args.steps, torch.device("cpu"))
        print(f"stages (s per s of audio): {stages['seconds_per_audio_second']}")
        qat = qat_step_time(root, args.qat_steps, 2, torch.device("cpu"))
        print(f"qat: {qat}")
        runs = {}
        if not args.skip_runs:
            common = [f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", f"train.batch_size={args.batch}",
                      "data.max_utts.dev=2", "data.max_utts.test=2", "train.resume=false"]
            for name, extra in (("cache_w0", ["train.cache_features=true", "train.num_workers=0"]),
                                ("live_w0", ["train.cache_features=false", "train.num_workers=0"]),
                                ("live_w2", ["train.cache_features=false", "train.num_workers=2"])):
                runs[name] = recipe_run(root, work, name, common + extra, args.threads)
                print(f"{name}: {runs[name]['steps_per_s']} steps/s, cache {runs[name]['feature_cache_bytes'] / 1e6:.1f} MB, "
                      f"run {runs[name]['wall_s']} s")
        result = {"machine": {"cpu_threads": args.threads, "torch": torch.__version__}, "corpus": corpus,
                  "batch": args.batch, "steps": args.steps, "stages": stages, "qat": qat, "runs": runs,
                  "projection": projection(stages, qat)}
        write_json_atomic(Path(args.out), result)
        print(json.dumps(result["projection"], indent=1))
        print(f"-> {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
