"""The `mini` corpus: LibriSpeech-layout English speech synthesized offline with eSpeak NG.

Speakers are eSpeak (accent, voice variant) pairs (8 English accents x ~100 variants), each with its own
base rate / pitch; every utterance jitters rate and pitch, adds silence padding, gain and light noise.
Sentences come from a small template grammar: closed-class words written here plus content words drawn
from wordfreq's English frequency list. Everything is a function of `data.seed` and `data.mini`:

* texts and per-utterance settings come from RNGs seeded by (seed, split, index);
* eSpeak carries state between utterances, so audio is synthesized in fixed shards of SHARD_SIZE
  utterances, each in a fresh worker process: the bytes do not depend on the number of workers.

Layout (``<cache_dir>/corpora/mini-<hash>/``)::

    corpus.json                     settings + speaker table
    <split>/SPEAKERS.TXT            speaker id | accent+variant | base rate | base pitch
    <split>/manifest.tsv            per-utterance voice, rate, pitch, duration
    <split>/<spk>/<chapter>/<spk>-<chapter>-NNNN.flac + <spk>-<chapter>.trans.txt

Each split is built into a temporary folder and renamed when complete, under a file lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qspeech.atomic import build_lock, ensure_folder, write_text_atomic
from qspeech.data.audio import resample
from qspeech.data.config import SPLITS, DataConfig, MiniConfig
from qspeech.data.espeak import ACCENTS, Espeak, english_accents, espeak_version, voice_variants
from qspeech.data.text import normalize_text, number_to_words
from qspeech.errors import ConfigError, DataError

__all__ = ["GENERATOR_VERSION", "SHARD_SIZE", "mini_root", "corpus_hash", "ensure_split", "speaker_table",
           "make_sentence", "run_shards", "default_workers"]

# Bump when generation changes so that old caches are not reused.
GENERATOR_VERSION = 1
SHARD_SIZE = 100
SAMPLE_RATE = 16000
_CHAPTER = {"train": 1, "dev": 2, "test": 3, "unlabeled": 4}

# ----------------------------------------------------------------------------------------- sentences

_DET = ("the", "a", "this", "that", "every", "some", "no", "my", "your", "his", "her", "our", "their",
        "each", "any", "one", "another", "the", "the", "a")
_PREP = ("in", "on", "at", "with", "from", "into", "over", "under", "near", "behind", "after", "before",
         "about", "across", "through", "without", "beside", "for", "of", "to", "by", "around")
_PRON = ("i", "you", "he", "she", "we", "they", "it", "nobody", "someone", "everyone")
_OBJ = ("me", "you", "him", "her", "us", "them", "it")
_AUX = ("will", "can", "could", "should", "would", "might", "must", "did", "does", "may", "never", "always")
_CONJ = ("and", "but", "or", "so", "because", "while", "when", "although", "until", "if")
_FUNCTION = set(_DET + _PREP + _PRON + _OBJ + _AUX + _CONJ)
# Clause templates: D det, X content word, P preposition, R pronoun, O object pronoun, A auxiliary, N number.
_CLAUSES = (
    "D X X", "R X D X", "R A X D X", "D X X P D X", "R X P D X", "X X P X", "D X A X O", "R A X P D X X",
    "N X P D X", "R X N X", "X D X", "D X X X", "R A X", "D X P O", "X P D X X", "D X X A X", "X X",
    "R X O P D X", "D X", "N X X",
)
_CONTINUATIONS = ("C", "C", "C", "P D")
# Words eSpeak would not read as a word, or that do not belong in a speech corpus.
_BLOCK_EXACT = {
    "sex", "sexy", "porn", "rape", "raped", "nude", "nudes", "dick", "cock", "pussy", "tits", "boobs", "anal",
    "penis", "vagina", "bitch", "bitches", "slut", "whore", "twat", "fag", "retard", "retarded", "nazi", "nazis",
    "www", "http", "https", "html", "com", "org", "xxx", "lol", "lmao", "omg", "wtf", "btw", "idk", "tbh",
}
_BLOCK_SUB = ("fuck", "shit", "cunt", "nigg", "fagg", "whore", "porn", "slut", "bitch")
_TWO_LETTER = {"am", "an", "as", "at", "be", "by", "do", "go", "he", "if", "in", "is", "it", "me", "my",
               "no", "of", "oh", "on", "or", "so", "to", "up", "us", "we"}


def _ok_word(w: str) -> bool:
    if not re.fullmatch(r"[a-z]+('[a-z]+)?", w):
        return False
    if len(w) <= 2 and w not in _TWO_LETTER and w not in ("a", "i"):
        return False
    if not any(c in "aeiouy" for c in w) or w in _BLOCK_EXACT or any(b in w for b in _BLOCK_SUB):
        return False
    return True


@lru_cache(maxsize=4)
def content_vocabulary(vocab_size: int) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Content words (wordfreq English, most frequent first) and their cumulative sampling weights."""
    try:
        import wordfreq  # its word list is large: loaded when the corpus is built
    except ImportError:  # pragma: no cover - declared dependency
        raise DataError("the mini corpus needs wordfreq: pip install wordfreq") from None
    raw = wordfreq.top_n_list("en", int(vocab_size * 1.25) + 500)
    words = [w for w in raw if w not in _FUNCTION and _ok_word(w)][:vocab_size]
    # flattened Zipf: frequent words stay frequent but rare words appear often enough to be many
    weights = np.cumsum((np.arange(len(words)) + 20.0) ** -0.6)
    return tuple(words), tuple(float(x) for x in weights)


def _number_phrase(rng: random.Random) -> str:
    u = rng.random()
    n = rng.randint(1, 20) if u < 0.6 else rng.randint(21, 99) if u < 0.9 else rng.randint(100, 2000)
    return number_to_words(n)


def make_sentence(rng: random.Random, min_words: int, max_words: int, vocab_size: int) -> str:
    """One lower-case pseudo-sentence of min_words..max_words words (commas mark clause boundaries)."""
    words, cum = content_vocabulary(vocab_size)
    target = rng.randint(min_words, max_words)

    def fill(slot: str) -> list[str]:
        if slot == "X":
            return [rng.choices(words, cum_weights=cum)[0]]
        if slot == "N":
            return _number_phrase(rng).split()
        table = {"D": _DET, "P": _PREP, "R": _PRON, "O": _OBJ, "A": _AUX, "C": _CONJ}[slot]
        return [rng.choice(table)]

    out: list[str] = []
    while len(out) < target:
        if out:
            cont = rng.choice(_CONTINUATIONS).split()
            if cont[0] == "C":
                out[-1] += ","
            for slot in cont:
                out += fill(slot)
            if cont[0] == "P":
                out += fill("X")
                continue
        for slot in rng.choice(_CLAUSES).split():
            out += fill(slot)
    out = out[:target]
    while len(out) > 1 and out[-1].rstrip(",") in _FUNCTION and out[-1].rstrip(",") not in _OBJ:
        out.pop()
    while len(out) < target:
        out += fill("X")
    out = out[:max_words]
    return " ".join(out).rstrip(",")


# ----------------------------------------------------------------------------------------- speakers

def _rng(seed: int, *keys) -> random.Random:
    h = hashlib.sha256(json.dumps([seed, *keys]).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def speaker_table(seed: int, m: MiniConfig) -> dict[str, list[dict]]:
    """Speakers per split: {'train': [...], 'dev': [...], 'test': [...], 'unlabeled': [...]}.

    train/dev/test are disjoint; unlabeled = train speakers + its own extra voices (never dev/test ones).
    """

    accents, variants = english_accents(), voice_variants()
    rng = _rng(seed, "speakers")
    by_accent = {}
    for a in accents:
        vs = list(variants)
        rng.shuffle(vs)
        by_accent[a] = vs
    order: list[tuple[str, str]] = []
    acc = list(accents)
    while any(by_accent.values()):  # round robin over accents, so every split covers all of them
        rng.shuffle(acc)
        for a in acc:
            if by_accent[a]:
                order.append((a, by_accent[a].pop()))
    counts = {"test": m.test_speakers if m.n_test else 0, "dev": m.dev_speakers if m.n_dev else 0,
              "train": m.train_speakers if m.n_train or m.n_unlabeled else 0,
              "unlabeled": m.unlabeled_speakers if m.n_unlabeled else 0}
    need = sum(counts.values())
    if need > len(order):
        raise ConfigError(
            f"data.mini asks for {need} speakers but eSpeak NG has {len(order)} English voice combinations: "
            "lower data.mini.*_speakers"
        )
    table: dict[str, list[dict]] = {}
    pos = 0
    for split in ("test", "dev", "train", "unlabeled"):
        spks = []
        for accent, variant in order[pos: pos + counts[split]]:
            sid = f"{ACCENTS.index(accent) + 1}{variant_index(variant):03d}"
            r = _rng(seed, "speaker", sid)
            spks.append({
                "id": sid, "voice": f"{accent.lower()}+{variant}", "accent": accent, "variant": variant,
                "rate": round(r.uniform(*m.rate)), "pitch": round(r.uniform(*m.pitch)),
                "range": round(r.uniform(30, 80)),
            })
        table[split] = spks
        pos += counts[split]
    table["unlabeled"] = table["train"] + table["unlabeled"]
    if not m.n_train:
        table["train"] = []
    return table


def variant_index(variant: str) -> int:

    return voice_variants().index(variant)


# ----------------------------------------------------------------------------------------- hashing / paths

def _settings(cfg: DataConfig) -> dict:

    mini = asdict(cfg.mini)
    mini.pop("workers", None)
    return {"generator": GENERATOR_VERSION, "shard_size": SHARD_SIZE, "espeak": espeak_version(),
            "seed": cfg.seed, "mini": mini}


def corpus_hash(cfg: DataConfig) -> str:
    return hashlib.sha256(json.dumps(_settings(cfg), sort_keys=True).encode()).hexdigest()[:12]


def mini_root(cfg: DataConfig, cache_dir) -> Path:
    return Path(os.path.expanduser(str(cache_dir))) / "corpora" / f"mini-{corpus_hash(cfg)}"


# ----------------------------------------------------------------------------------------- synthesis

def _plan(cfg: DataConfig, split: str, speakers: list[dict]) -> list[dict]:
    m = cfg.mini
    n = {"train": m.n_train, "dev": m.n_dev, "test": m.n_test, "unlabeled": m.n_unlabeled}[split]
    spks = list(speakers)
    _rng(cfg.seed, "order", split).shuffle(spks)
    per_spk: dict[str, int] = {}
    jobs = []
    chapter = _CHAPTER[split]
    for i in range(n):
        spk = spks[i % len(spks)]
        k = per_spk.get(spk["id"], 0)
        per_spk[spk["id"]] = k + 1
        r = _rng(cfg.seed, "utt", split, i)
        text = make_sentence(r, m.min_words, m.max_words, m.vocab_size)
        utt_id = f"{spk['id']}-{chapter}-{k:04d}"
        jobs.append({
            "utt_id": utt_id, "speaker": spk["id"], "voice": spk["voice"],
            "rel": f"{spk['id']}/{chapter}/{utt_id}.flac", "text": text,
            "rate": int(np.clip(round(spk["rate"] * r.uniform(0.9, 1.1)), 80, 450)),
            "pitch": int(np.clip(round(spk["pitch"] + r.uniform(-8, 8)), 0, 100)),
            "range": int(np.clip(round(spk["range"] + r.uniform(-10, 10)), 0, 100)),
            "gain": r.uniform(0.3, 0.9), "pad": [r.uniform(0.05, 0.3), r.uniform(0.05, 0.35)],
            "snr": None if m.noise_snr_db is None else r.uniform(*m.noise_snr_db),
            "noise_seed": r.getrandbits(32), "max_seconds": m.max_seconds, "min_words": m.min_words,
        })
    return jobs


def _render(job: dict, engine) -> tuple[str, np.ndarray]:
    """Synthesize one utterance -> (text actually spoken, int16 16 kHz); too long: fewer words."""

    words = job["text"].split()
    pad = job["pad"]
    budget = job["max_seconds"] - pad[0] - pad[1]
    while True:
        raw = engine.synth(" ".join(words) + ".", job["voice"], job["rate"], job["pitch"], job["range"],
                           seed=job["noise_seed"])
        wav = raw.astype(np.float32) / 32768.0
        nz = np.flatnonzero(np.abs(wav) > 1e-3)
        if nz.size:
            wav = wav[max(0, nz[0] - 40): nz[-1] + 41]
        dur = wav.size / engine.sample_rate
        if dur <= budget or len(words) <= job["min_words"]:
            break
        keep = max(job["min_words"], min(len(words) - 1, int(len(words) * budget / max(dur, 1e-6))))
        words = words[:keep]
        while len(words) > job["min_words"] and words[-1].rstrip(",") in _FUNCTION - set(_OBJ):
            words.pop()
    if nz.size == 0:
        raise DataError(f"eSpeak NG produced silence for {job['utt_id']} ({job['voice']})")
    wav = resample(wav, engine.sample_rate, SAMPLE_RATE)
    wav = wav * (job["gain"] / max(float(np.abs(wav).max()), 1e-6))
    wav = np.concatenate([np.zeros(int(pad[0] * SAMPLE_RATE), np.float32), wav,
                          np.zeros(int(pad[1] * SAMPLE_RATE), np.float32)])
    if job["snr"] is not None:
        speech_power = float(np.mean(wav ** 2)) + 1e-12
        noise = np.random.default_rng(job["noise_seed"]).standard_normal(wav.size).astype(np.float32)
        wav = wav + noise * np.float32(np.sqrt(speech_power / 10 ** (job["snr"] / 10)))
    pcm = np.clip(np.round(wav * 32767.0), -32768, 32767).astype(np.int16)
    return " ".join(w.rstrip(",") for w in words), pcm


def _synth_shard(out_dir: str, jobs: list[dict]) -> list[dict]:
    """Worker: synthesize a shard in order (fresh process) and write FLAC files under out_dir."""
    import soundfile as sf  # libsndfile, in the worker process only


    engine = Espeak()
    rows = []
    for job in jobs:
        text, pcm = _render(job, engine)
        path = os.path.join(out_dir, job["rel"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sf.write(path, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        rows.append({"utt_id": job["utt_id"], "speaker": job["speaker"], "voice": job["voice"],
                     "rate": job["rate"], "pitch": job["pitch"], "rel": job["rel"],
                     "duration_s": round(pcm.size / SAMPLE_RATE, 4), "text": normalize_text(text)})
    return rows


def _worker_cmd(out_dir: Path) -> tuple[list[str], dict]:
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return [sys.executable, "-m", "qspeech.data.mini", str(out_dir)], env


def run_shards(out_dir: Path, shards: list[list[dict]], workers: int, desc: str, progress: bool) -> list[dict]:
    """Synthesize each shard in its own fresh interpreter (eSpeak state never crosses shards), `workers` at a time.

    Plain subprocesses rather than multiprocessing: nothing of the caller (its __main__, threads, torch) is
    re-imported or forked.
    """
    cmd, env = _worker_cmd(out_dir)
    results: list[list[dict] | None] = [None] * len(shards)
    pending = list(range(len(shards)))
    running: dict[int, tuple[subprocess.Popen, object]] = {}
    bar = tqdm(total=sum(map(len, shards)), desc=desc, unit="utt", disable=not progress, file=sys.stderr)
    try:
        while pending or running:
            while pending and len(running) < workers:
                i = pending.pop(0)
                err = tempfile.TemporaryFile()
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
                proc.stdin.write(json.dumps(shards[i]).encode())
                proc.stdin.close()
                running[i] = (proc, err)
            done = [i for i, (p, _) in running.items() if p.poll() is not None]
            if not done:
                time.sleep(0.05)
                continue
            for i in done:
                proc, err = running.pop(i)
                out = proc.stdout.read()
                proc.stdout.close()
                err.seek(0)
                msg = err.read().decode(errors="replace").strip().splitlines()
                err.close()
                if proc.returncode != 0:
                    raise DataError(f"mini corpus synthesis failed (exit {proc.returncode}): "
                                    f"{msg[-1] if msg else 'no message'}")
                results[i] = json.loads(out)
                bar.update(len(shards[i]))
    finally:
        for proc, err in running.values():
            proc.kill()
            proc.wait()
            err.close()
        bar.close()
    return [row for shard in results for row in shard]  # type: ignore[union-attr]


def default_workers() -> int:
    """How many synthesis processes run at once by default: the CPUs this process may use, at most 2."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        n = os.cpu_count() or 1
    return max(1, min(2, n))


def _write_split_files(tmp: Path, split: str, rows: list[dict], speakers: list[dict]) -> None:
    by_chapter: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        spk, chapter, _ = row["utt_id"].split("-")
        by_chapter.setdefault((spk, chapter), []).append(row)
    for (spk, chapter), rs in by_chapter.items():
        with open(tmp / spk / chapter / f"{spk}-{chapter}.trans.txt", "w") as f:
            for r in sorted(rs, key=lambda r: r["utt_id"]):
                f.write(f"{r['utt_id']} {r['text']}\n")
    with open(tmp / "manifest.tsv", "w") as f:
        f.write("utt_id\taudio\tduration_s\tsample_rate\tspeaker\tvoice\trate\tpitch\ttext\n")
        for r in sorted(rows, key=lambda r: r["utt_id"]):
            f.write(f"{r['utt_id']}\t{r['rel']}\t{r['duration_s']}\t{SAMPLE_RATE}\t{r['speaker']}\t"
                    f"{r['voice']}\t{r['rate']}\t{r['pitch']}\t{r['text']}\n")
    with open(tmp / "SPEAKERS.TXT", "w") as f:
        f.write(";ID  |ACCENT+VARIANT|RATE|PITCH|SUBSET\n")
        for s in sorted(speakers, key=lambda s: s["id"]):
            f.write(f"{s['id']}|{s['voice']}|{s['rate']}|{s['pitch']}|{split}\n")


def ensure_split(cfg: DataConfig, split: str, cache_dir, progress: bool = True) -> Path:
    """Build the mini corpus split if it is not complete yet; return the corpus root."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use {', '.join(SPLITS)}")
    root = mini_root(cfg, cache_dir)
    final = root / split
    if final.is_dir():
        return root
    ensure_folder(root, "the corpus cache", "set QSPEECH_CACHE to a writable folder")
    with build_lock(root / f".{split}.lock"):
        if final.is_dir():  # another process finished it while we waited
            return root
        for stale in root.glob(f".tmp-{split}-*"):  # an interrupted build: never reused
            shutil.rmtree(stale, ignore_errors=True)
        speakers = speaker_table(cfg.seed, cfg.mini)
        info = root / "corpus.json"
        if not info.exists():
            write_text_atomic(info, json.dumps({**_settings(cfg), "speakers": speakers}, indent=1, sort_keys=True))
        jobs = _plan(cfg, split, speakers[split])
        tmp = root / f".tmp-{split}-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir()
        try:
            shards = [jobs[i: i + SHARD_SIZE] for i in range(0, len(jobs), SHARD_SIZE)]
            workers = min(cfg.mini.workers or default_workers(), max(1, len(shards)))
            rows = run_shards(tmp, shards, workers, f"synthesizing mini/{split}", progress) if shards else []
            _write_split_files(tmp, split, rows, speakers[split])
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root


def _worker_main(argv: list[str]) -> int:
    """`python -m qspeech.data.mini OUT_DIR` < shard.json > rows.json (one shard, fresh eSpeak state)."""
    jobs = json.loads(sys.stdin.buffer.read())
    try:
        rows = _synth_shard(argv[0], jobs)
    except DataError as e:
        print(str(e), file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps(rows))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
