"""A tiny self-made corpus + a stand-in for qspeech.data's API, for the ASR / training / cache tests.

Used instead of qspeech.data so that these tests are independent of the synthesized corpus: noise
waveforms (distinct per utterance) with short transcripts, written with soundfile under tmp_path.
"""

from __future__ import annotations

import hashlib
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from omegaconf import OmegaConf

import qspeech.data

from qspeech.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["A CAT", "THE DOG RAN", "HELLO WORLD", "IT'S FINE", "GO UP", "BLUE SKY", "ONE TWO", "YES NO",
         "RED HAT", "SIT DOWN", "WE WIN", "BIG BOX"]


@dataclass
class Utt:
    utt_id: str
    path: str
    text: str
    speaker: str
    duration_s: float


def write_corpus(root: Path, n: dict, seconds=(1.0, 1.6), seed: int = 0) -> dict[str, list[Utt]]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    k = 0
    for split, count in n.items():
        utts = []
        for i in range(count):
            dur = float(rng.uniform(*seconds))
            wav = (0.1 * rng.standard_normal(int(dur * 16000))).astype(np.float32)
            p = root / f"{split}_{i}.wav"
            sf.write(p, wav, 16000)
            utts.append(Utt(f"{split}-{i}", str(p), TEXTS[k % len(TEXTS)], f"spk{i % 3}", len(wav) / 16000))
            k += 1
        out[split] = utts
    return out


def read_audio(path) -> np.ndarray:
    try:
        wav, sr = sf.read(str(path), dtype="float32")
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read {path}: {e}") from None
    return wav


def use_corpus(monkeypatch, corpus: dict[str, list[Utt]]) -> None:
    """qspeech.data's load_split, config_fingerprint and read_audio serve `corpus` (the CTC tasks read
    their data through them)."""
    def load_split(data_cfg, split, cache_dir):
        return corpus[split]

    def config_fingerprint(data_cfg, split):
        h = hashlib.sha256(split.encode())
        for u in corpus[split]:
            h.update(f"{u.utt_id}{u.text}".encode())
        return h.hexdigest()[:16]

    monkeypatch.setattr(qspeech.data, "load_split", load_split)
    monkeypatch.setattr(qspeech.data, "config_fingerprint", config_fingerprint)
    monkeypatch.setattr(qspeech.data, "read_audio", read_audio)


def tiny_upstream(seed: int = 0):
    from qspeech.upstream import build_upstream

    from conftest import model_cfg

    torch.manual_seed(seed)
    return build_upstream(model_cfg("tiny_hubert", init="random"))


def make_cfg(tmp_path: Path, task: str = "asr_small", **train) -> types.SimpleNamespace:
    """What run_task reads of a run config: typed task and train (conf/task/<task>.yaml, conf/train/cpu.yaml
    with `train` overrides such as {"train.max_steps": 3}), the fixture data, seed and cache folder."""
    from qspeech.checks import typed
    from qspeech.tasks.asr import ASRConfig
    from qspeech.train import TrainConfig

    cfg = OmegaConf.create({"task": OmegaConf.load(ROOT / f"conf/task/{task}.yaml"),
                            "train": OmegaConf.load(ROOT / "conf/train/cpu.yaml")})
    cfg.train.num_threads = 1  # the CI machine has 2 cores; oversubscribed OpenMP threads crawl
    for k, v in train.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return types.SimpleNamespace(task=typed(ASRConfig, cfg.task, "task"), train=typed(TrainConfig, cfg.train, "train"),
                                 data=types.SimpleNamespace(name="fixture", kind="fixture"), seed=0,
                                 cache_dir=str(tmp_path / "cache"))


def test_fixture_reads_back(tmp_path):
    corpus = write_corpus(tmp_path, {"train": 2})
    wav = read_audio(corpus["train"][0].path)
    assert wav.dtype == np.float32 and abs(len(wav) / 16000 - corpus["train"][0].duration_s) < 1e-6
