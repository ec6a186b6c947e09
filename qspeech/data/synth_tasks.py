"""Synthesized corpora for the offline SUPERB classification tasks (ks_small, sid_small, ic_small), built with
eSpeak NG through the mini corpus's synthesis workers (qspeech.data.mini: fresh process per shard of 100, so
the audio does not depend on the number of workers) and cached like it:

* ks:  Speech Commands v1 style: the 10 keywords, "_unknown_" (one of Speech Commands' 20 auxiliary words)
       and "_silence_" (1 s of background noise, no speech), 12 balanced classes; dev/test voices held out.
* sid: one class per eSpeak voice (accent + variant, each with its own base rate / pitch), the same voices in
       every split speaking different sentences (identification, VoxCeleb1 style).
* ic:  Fluent Speech Commands style: 31 (action, object, location) intents, several phrasings each
       ("turn on the lights in the kitchen"); dev/test voices held out.

Layout: ``<cache_dir>/corpora/<task>-<hash of the settings>/<split>/labels.tsv`` (utt_id, audio, duration_s,
speaker, label) beside the FLAC files; each split is built in a temporary folder and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qspeech.atomic import build_lock
from qspeech.checks import integer, pair
from qspeech.data.config import MiniConfig
from qspeech.data.espeak import espeak_version
from qspeech.data.labeled import LabeledUtterance
from qspeech.data.mini import GENERATOR_VERSION, SHARD_SIZE, default_workers, make_sentence, run_shards, speaker_table
from qspeech.errors import ConfigError, DataError

__all__ = ["KS_KEYWORDS", "KS_UNKNOWN_WORDS", "KS_CLASSES", "IC_INTENTS", "SynthConfig", "load_synth_split",
           "synth_root"]

VERSION = 1
SAMPLE_RATE = 16_000
SPLITS = ("train", "dev", "test")

# Speech Commands v1.0: the 10 SUPERB keywords and the 20 auxiliary words that make up "_unknown_".
KS_KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
KS_UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin", "nine", "one",
                    "seven", "sheila", "six", "three", "tree", "two", "wow", "zero")
KS_CLASSES = (*KS_KEYWORDS, "_unknown_", "_silence_")

# Fluent Speech Commands' 31 intents (action, object, location) with phrasings; {loc} is "" or " in the <room>".
_ROOMS = {"kitchen": ("kitchen",), "bedroom": ("bedroom",), "washroom": ("washroom", "bathroom")}
_PHRASES = {
    ("activate", "lights"): ("turn on the lights{loc}", "switch on the lights{loc}", "lights on{loc}"),
    ("deactivate", "lights"): ("turn off the lights{loc}", "switch off the lights{loc}", "lights off{loc}"),
    ("increase", "heat"): ("turn up the heat{loc}", "increase the heating{loc}", "make it warmer{loc}"),
    ("decrease", "heat"): ("turn down the heat{loc}", "decrease the heating{loc}", "make it cooler{loc}"),
    ("activate", "music"): ("play the music", "turn on the music", "start the music"),
    ("deactivate", "music"): ("stop the music", "turn off the music", "pause the music"),
    ("activate", "lamp"): ("turn on the lamp", "switch the lamp on", "lamp on"),
    ("deactivate", "lamp"): ("turn off the lamp", "switch the lamp off", "lamp off"),
    ("increase", "volume"): ("turn up the volume", "increase the volume", "louder please"),
    ("decrease", "volume"): ("turn down the volume", "decrease the volume", "quieter please"),
    ("bring", "newspaper"): ("bring me the newspaper", "fetch the newspaper", "get me the paper"),
    ("bring", "juice"): ("bring me some juice", "fetch the juice", "get me a juice"),
    ("bring", "socks"): ("bring me my socks", "fetch my socks", "get my socks"),
    ("bring", "shoes"): ("bring me my shoes", "fetch my shoes", "get my shoes"),
    ("change language", "none"): ("change the language", "switch the language", "use another language"),
    ("change language", "Chinese"): ("switch the language to chinese", "set my language to chinese", "chinese please"),
    ("change language", "Korean"): ("switch the language to korean", "set my language to korean", "korean please"),
    ("change language", "English"): ("switch the language to english", "set my language to english", "english please"),
    ("change language", "German"): ("switch the language to german", "set my language to german", "german please"),
}
_WITH_ROOMS = {("activate", "lights"), ("deactivate", "lights"), ("increase", "heat"), ("decrease", "heat")}
IC_INTENTS = tuple(
    (a, o, loc) for (a, o) in _PHRASES for loc in (("none", *_ROOMS) if (a, o) in _WITH_ROOMS else ("none",)))
assert len(IC_INTENTS) == 31  # Fluent Speech Commands' intent count


@dataclass
class SynthConfig:
    """Size and voices of a synthesized task corpus (the `corpus` key of ks_small / sid_small / ic_small)."""

    n_train: int = 1200
    n_dev: int = 240
    n_test: int = 240
    # Voices (eSpeak accent + variant): disjoint per split for ks/ic; sid uses train_speakers in every split.
    train_speakers: int = 40
    dev_speakers: int = 8
    test_speakers: int = 8
    seed: int = 0
    rate: list[float] = field(default_factory=lambda: [140.0, 210.0])  # speaker base rate (words/min)
    pitch: list[float] = field(default_factory=lambda: [25.0, 75.0])  # speaker base pitch (0-100)
    noise_snr_db: list[float] | None = field(default_factory=lambda: [20.0, 40.0])  # white noise; null: clean
    workers: int | None = None  # synthesis processes (null: up to 2); does not change the audio

    def __post_init__(self):
        for k in ("n_train", "n_dev", "n_test", "train_speakers", "dev_speakers", "test_speakers"):
            integer(self, k, 1)
        integer(self, "seed", 0)
        integer(self, "workers", 1, optional=True)
        pair(self, "rate", 80, 450)
        pair(self, "pitch", 0, 100)
        pair(self, "noise_snr_db", -20, 120, optional=True)
        self.rate, self.pitch = [float(x) for x in self.rate], [float(x) for x in self.pitch]
        if self.noise_snr_db is not None:
            self.noise_snr_db = [float(x) for x in self.noise_snr_db]


def _settings(task: str, cfg: SynthConfig) -> dict:

    s = asdict(cfg)
    s.pop("workers")
    if task == "sid":  # one speaker set for every split
        s.pop("dev_speakers"), s.pop("test_speakers")
    return {"v": VERSION, "mini": GENERATOR_VERSION, "espeak": espeak_version(), "task": task, **s}


def synth_root(task: str, cfg: SynthConfig, cache_dir) -> Path:
    h = hashlib.sha256(json.dumps(_settings(task, cfg), sort_keys=True).encode()).hexdigest()[:12]
    return Path(os.path.expanduser(str(cache_dir))) / "corpora" / f"{task}-{h}"


def _rng(*keys) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(json.dumps(keys).encode()).digest()[:8], "little"))


def _speakers(task: str, cfg: SynthConfig) -> dict[str, list[dict]]:

    sid = task == "sid"
    mini = MiniConfig(n_train=1, n_dev=0 if sid else 1, n_test=0 if sid else 1, n_unlabeled=0,
                      train_speakers=cfg.train_speakers, dev_speakers=0 if sid else cfg.dev_speakers,
                      test_speakers=0 if sid else cfg.test_speakers, unlabeled_speakers=0, rate=cfg.rate,
                      pitch=cfg.pitch, noise_snr_db=cfg.noise_snr_db)
    table = speaker_table(cfg.seed, mini)
    return {s: table["train"] if sid else table[s] for s in SPLITS}


def _content(task: str, r: random.Random, i: int, n: int) -> tuple[str, str, int]:
    """(label, text to speak, min_words: the renderer never cuts below it) of utterance i of n."""
    if task == "ks":
        label = KS_CLASSES[i % len(KS_CLASSES)]
        word = r.choice(KS_UNKNOWN_WORDS) if label == "_unknown_" else label
        return label, ("" if label == "_silence_" else word), 1
    if task == "ic":
        action, obj, loc = IC_INTENTS[i % len(IC_INTENTS)]
        room = "" if loc == "none" else f" in the {r.choice(_ROOMS[loc])}"
        text = r.choice(_PHRASES[(action, obj)]).format(loc=room)
        return f"{action};{obj};{loc}", text, len(text.split())

    return "", make_sentence(r, 3, 8, 2000), 3  # sid: the label is the speaker


def _plan(task: str, cfg: SynthConfig, split: str, speakers: list[dict]) -> list[dict]:
    n = getattr(cfg, f"n_{split}")
    order = list(range(n))
    _rng(cfg.seed, task, split, "order").shuffle(order)  # classes spread over speakers
    jobs = []
    for k, i in enumerate(order):
        spk = speakers[k % len(speakers)]
        r = _rng(cfg.seed, task, split, i)
        label, text, min_words = _content(task, r, i, n)
        utt_id = f"{task}-{split}-{spk['id']}-{i:05d}"
        jobs.append({
            "utt_id": utt_id, "speaker": spk["id"], "voice": spk["voice"], "rel": f"{spk['id']}/{utt_id}.flac",
            "text": text, "label": label or spk["id"],
            "rate": int(np.clip(round(spk["rate"] * r.uniform(0.9, 1.1)), 80, 450)),
            "pitch": int(np.clip(round(spk["pitch"] + r.uniform(-8, 8)), 0, 100)),
            "range": int(np.clip(round(spk["range"] + r.uniform(-10, 10)), 0, 100)),
            "gain": r.uniform(0.3, 0.9), "pad": [r.uniform(0.05, 0.3), r.uniform(0.05, 0.3)],
            "snr": None if cfg.noise_snr_db is None else r.uniform(*cfg.noise_snr_db),
            "noise_seed": r.getrandbits(32), "max_seconds": 8.0, "min_words": min_words,
        })
    return jobs


def _silence(out: Path, job: dict) -> dict:
    """Speech Commands' "_silence_": 1 s of background noise (white, brown or hum), no speech."""
    import soundfile as sf  # libsndfile, in the worker process only

    rng = np.random.default_rng(job["noise_seed"])
    x = rng.standard_normal(SAMPLE_RATE).astype(np.float32)
    kind = job["noise_seed"] % 3
    if kind == 1:  # brown: integrated white noise
        x = np.cumsum(x)
        x -= np.linspace(x[0], x[-1], x.size)
    elif kind == 2:  # mains hum with harmonics and a little hiss
        t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
        x = sum(np.sin(2 * np.pi * 50 * h * t + rng.uniform(0, 6.3)) / h for h in (1, 2, 3)) + 0.1 * x
    x = x / max(float(np.abs(x).max()), 1e-6) * job["gain"] * 0.1
    path = out / job["rel"]
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.round(x * 32767).astype(np.int16), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return {"utt_id": job["utt_id"], "rel": job["rel"], "duration_s": 1.0}


def _build(task: str, cfg: SynthConfig, split: str, tmp: Path, progress: bool) -> list[dict]:

    jobs = _plan(task, cfg, split, _speakers(task, cfg)[split])
    speech = [j for j in jobs if j["text"]]
    rows = {r["utt_id"]: r for r in (_silence(tmp, j) for j in jobs if not j["text"])}
    shards = [speech[i: i + SHARD_SIZE] for i in range(0, len(speech), SHARD_SIZE)]
    workers = min(cfg.workers or default_workers(), max(1, len(shards)))
    if shards:
        rows.update({r["utt_id"]: r for r in run_shards(tmp, shards, workers, f"synthesizing {task}/{split}",
                                                         progress)})
    return [{**j, "duration_s": rows[j["utt_id"]]["duration_s"]} for j in jobs]


def _ensure(task: str, cfg: SynthConfig, split: str, cache_dir, progress: bool) -> Path:
    root = synth_root(task, cfg, cache_dir)
    final = root / split
    if (final / "labels.tsv").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with build_lock(root / f".{split}.lock"):
        if (final / "labels.tsv").is_file():
            return final
        shutil.rmtree(final, ignore_errors=True)
        tmp = root / f".tmp-{split}-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir()
        try:
            rows = _build(task, cfg, split, tmp, progress)
            with open(tmp / "labels.tsv", "w") as f:
                f.write("utt_id\taudio\tduration_s\tspeaker\tlabel\ttext\n")
                for r in sorted(rows, key=lambda r: r["utt_id"]):
                    f.write(f"{r['utt_id']}\t{r['rel']}\t{r['duration_s']}\t{r['speaker']}\t{r['label']}\t{r['text']}\n")
            (root / "corpus.json").write_text(json.dumps(_settings(task, cfg), indent=1, sort_keys=True))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def load_synth_split(task: str, cfg: SynthConfig, split: str, cache_dir, progress: bool = True
                     ) -> list[LabeledUtterance]:
    """The synthesized `split` of task ks | sid | ic, built into <cache_dir>/corpora/ on first use."""
    if task not in ("ks", "sid", "ic"):
        raise ConfigError(f"no synthesized corpus for task kind {task!r}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    folder = _ensure(task, cfg, split, cache_dir, progress)
    out = []
    with open(folder / "labels.tsv") as f:
        next(f)
        for line in f:
            utt_id, rel, dur, spk, label, _ = line.rstrip("\n").split("\t")
            out.append(LabeledUtterance(utt_id, str(folder / rel), label, spk, float(dur)))
    if not out:
        raise DataError(f"the synthesized {task} corpus {folder} has no utterances: delete the folder to rebuild it")
    return out
