"""Fast tests of qspeech.data (whole file: a few seconds; the mini corpus is built tiny)."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from qspeech.data import (
    DataWarning, Utterance, check_data_paths, config_fingerprint, data_config, load_split, normalize_text, prepare,
    read_audio, record_skips,
)
from qspeech.data.mini import mini_root
from qspeech.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real-speech"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/real-speech is not available")


def _tone(seconds: float, sr: int) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


# ----------------------------------------------------------------------------------------- text

@pytest.mark.parametrize("raw, expected", [
    ("Hello, world!", "HELLO WORLD"),
    ("Don\u2019t stop, 2nd-rate!", "DON'T STOP SECOND RATE"),
    ("It has a semi-prehensile tail.", "IT HAS A SEMI PREHENSILE TAIL"),
    ('"Quoted," she said. \'yes\'', "QUOTED SHE SAID YES"),
    ("I have 3 cats and 21 dogs", "I HAVE THREE CATS AND TWENTY ONE DOGS"),
    ("1,250 people", "ONE THOUSAND TWO HUNDRED FIFTY PEOPLE"),
    ("$3.50 or 45%", "THREE DOLLARS FIFTY CENTS OR FORTY FIVE PERCENT"),
    ("rock & roll", "ROCK AND ROLL"),
    ("Caf\u00e9  na\u00efve", "CAFE NAIVE"),
    ("  ...  ", ""),
    ("LIBRISPEECH STYLE TEXT", "LIBRISPEECH STYLE TEXT"),
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


# ----------------------------------------------------------------------------------------- audio

@pytest.mark.parametrize("sr", [8000, 16000, 22050, 44100])
def test_read_audio_resamples_to_16k(tmp_path, sr):
    p = tmp_path / f"tone{sr}.wav"
    sf.write(p, np.stack([_tone(1.5, sr)] * 2, axis=1), sr)  # stereo -> mono as well
    wav = read_audio(p)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - 24000) <= 2
    assert 0.25 < np.abs(wav).max() < 0.35


def test_read_audio_errors(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC this is not really flac" * 10)
    zero = tmp_path / "zero.wav"
    sf.write(zero, np.zeros(0, np.float32), 16000)
    for p in (empty, corrupt, zero, tmp_path / "missing.wav"):
        with pytest.raises(DataError) as e:
            read_audio(p)
        msg = str(e.value)
        assert str(p) in msg and "\n" not in msg


# ----------------------------------------------------------------------------------------- config

def test_validate_data_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown data.kind"):
        data_config({"name": "x", "kind": "nope"})
    with pytest.raises(ConfigError, match="set data.root=/path/to/LibriSpeech"):
        check_data_paths(data_config(OmegaConf.load(REPO / "conf/data/librispeech.yaml")))
    with pytest.raises(ConfigError, match="manifest file not found"):
        check_data_paths(data_config({"name": "m", "kind": "manifest", "manifest": str(tmp_path / "none.tsv")}))
    with pytest.raises(ConfigError, match=">= 0"):
        data_config({"name": "m", "kind": "mini", "max_utts": {"train": -1}})
    with pytest.raises(ConfigError, match="data.mini.n_train"):
        data_config({"name": "m", "kind": "mini", "mini": {"n_train": -5}})
    with pytest.raises(ConfigError, match="speakers"):
        data_config({"name": "m", "kind": "mini", "mini": {"train_speakers": 5000}})
    with pytest.raises(ConfigError, match=r"data.max_skipped=1.5: must be a number in \[0.0, 1.0\]"):
        data_config({"name": "m", "kind": "mini", "max_skipped": 1.5})
    for name in ("mini", "manifest", "librispeech", "real_speech"):  # every yaml parses, has name and kind
        c = OmegaConf.load(REPO / f"conf/data/{name}.yaml")
        assert c.name == name and c.kind in ("mini", "manifest", "librispeech")


# ----------------------------------------------------------------------------------------- manifests

def _write_manifest(folder: Path, rows: list[tuple]) -> Path:
    lines = ["utt_id\taudio\tduration_s\tsample_rate\tspeaker\ttext"]
    lines += ["\t".join(map(str, r)) for r in rows]
    (folder / "manifest.tsv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.tsv"


def test_manifest_bad_rows_skipped_with_one_warning(tmp_path):
    (tmp_path / "a").mkdir()
    sf.write(tmp_path / "a" / "ok1.wav", _tone(1.0, 8000), 8000)
    sf.write(tmp_path / "a" / "ok2.wav", _tone(0.5, 22050), 22050)
    sf.write(tmp_path / "a" / "notext.wav", _tone(0.5, 16000), 16000)
    (tmp_path / "a" / "broken.wav").write_bytes(b"RIFF....garbage")
    tsv = _write_manifest(tmp_path, [
        ("u2", "a/ok2.wav", 0.5, 22050, "s2", "Second one."),
        ("u1", "a/ok1.wav", 1.0, 8000, "s1", "First, one!"),
        ("u3", "a/notext.wav", 0.5, 16000, "s1", "  ?! "),
        ("u4", "a/missing.wav", 1.0, 16000, "s2", "missing file"),
        ("u5", "a/broken.wav", 1.0, 16000, "s2", "broken file"),
    ])
    cfg = {"name": "t", "kind": "manifest", "manifest": str(tsv), "max_skipped": 0.6}
    with warnings.catch_warnings(record=True) as caught, record_skips() as skips:
        warnings.simplefilter("always")
        utts = load_split(data_config(cfg), "test", tmp_path / "cache")
    ours = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert "skipped 3 of 5" in msg and "missing.wav" in msg and "empty transcript" in msg
    assert sorted((Path(s.path).name, s.kind) for s in skips) == [
        ("broken.wav", "audio"), ("missing.wav", "audio"), ("notext.wav", "entry")]
    # above data.max_skipped (3 of 5 > 0.5): one-line DataError naming the bound, nothing recorded
    with pytest.raises(DataError, match=r"3 of 5 utterances are unusable, more than data.max_skipped=0.5 ") as e, \
            record_skips() as none:
        load_split(data_config({**cfg, "max_skipped": 0.5}), "test", tmp_path / "cache")
    assert "\n" not in str(e.value) and none == []
    assert [u.utt_id for u in utts] == ["u1", "u2"]
    assert utts[0] == Utterance("u1", os.path.abspath(tmp_path / "a" / "ok1.wav"), "FIRST ONE", "s1", 1.0)
    assert read_audio(utts[1].path).shape[0] == 8000
    assert "Error opening" not in msg
    # cap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        capped = load_split(data_config({**cfg, "max_utts": {"test": 1}}), "test", tmp_path)
    assert [u.utt_id for u in capped] in (["u1"], ["u2"])
    # nothing usable -> one-line DataError
    tsv2 = _write_manifest(tmp_path / "a", [("x", "missing.wav", 1, 16000, "s", "text")])
    with pytest.raises(DataError, match="no usable utterances") as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_split(data_config({"name": "t", "kind": "manifest", "manifest": str(tsv2)}), "dev", tmp_path)
    assert "\n" not in str(e.value)
    # fingerprints: stable, split- and content-dependent
    assert config_fingerprint(data_config(cfg), "test") == config_fingerprint(data_config(dict(cfg)), "test")
    assert config_fingerprint(data_config(cfg), "test") != config_fingerprint(data_config(cfg), "dev")


@needs_real
def test_manifest_real_speech():
    tsv = REAL / "pocketsphinx-librivox-cards" / "manifest.tsv"
    cfg = data_config({"name": "r", "kind": "manifest", "manifest": str(tsv)})
    utts = load_split(cfg, "test", "/nonexistent-cache")
    assert len(utts) == 10 and len({u.speaker for u in utts}) == 2
    assert all(set(u.text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ") and u.text for u in utts)
    u = next(u for u in utts if u.utt_id.endswith("0880"))
    assert u.text == "HE WAS NOT AN ILL DISPOSED YOUNG MAN"
    wav = read_audio(u.path)
    assert abs(len(wav) / 16000 - u.duration_s) < 0.01


@needs_real
def test_real_speech_conf_resolves(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = check_data_paths(data_config(OmegaConf.load(REPO / "conf/data/real_speech.yaml")))
    with pytest.raises(DataError, match="no train split"):
        load_split(cfg, "train", "/nonexistent-cache")


# ----------------------------------------------------------------------------------------- librispeech layout

def test_librispeech_layout(tmp_path):
    root = tmp_path / "LibriSpeech"
    for subset, spk, chap, n in (("dev-clean", "84", "121123", 2), ("dev-clean", "174", "50561", 1),
                                 ("test-clean", "61", "70968", 1)):
        d = root / subset / spk / chap
        d.mkdir(parents=True)
        lines = []
        for i in range(n):
            uid = f"{spk}-{chap}-{i:04d}"
            sf.write(d / f"{uid}.flac", _tone(0.5 + i * 0.25, 16000), 16000, format="FLAC")
            lines.append(f"{uid} WORDS OF UTTERANCE {i}")
        (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    cfg = OmegaConf.load(REPO / "conf/data/librispeech.yaml")
    cfg.root = str(root)
    cfg = data_config(cfg)
    dev = load_split(cfg, "dev", tmp_path / "cache")
    assert [u.utt_id for u in dev] == ["174-50561-0000", "84-121123-0000", "84-121123-0001"]
    assert dev[2].text == "WORDS OF UTTERANCE ONE" and dev[2].speaker == "84" and dev[2].duration_s == 0.75
    assert Path(dev[0].path).is_file()
    with pytest.raises(DataError, match="train-clean-100 not found"):
        load_split(cfg, "train", tmp_path / "cache")
    s = prepare(cfg, tmp_path / "cache", progress=False)
    assert s["splits"]["dev"]["n_utts"] == 3 and s["splits"]["test"]["n_speakers"] == 1
    assert "error" in s["splits"]["train"]


# ----------------------------------------------------------------------------------------- mini corpus

def _tiny_mini():
    cfg = OmegaConf.load(REPO / "conf/data/mini.yaml")
    cfg.mini.update(n_train=8, n_dev=3, n_test=3, n_unlabeled=5, train_speakers=3, dev_speakers=2,
                    test_speakers=2, unlabeled_speakers=2, workers=1)
    return data_config(cfg)


def _digest(utts):
    return [(u.utt_id, u.text, u.speaker, hashlib.sha256(Path(u.path).read_bytes()).hexdigest()) for u in utts]


def test_mini_tiny_deterministic_and_speaker_disjoint(tmp_path):
    cfg = _tiny_mini()
    stale = mini_root(cfg, tmp_path / "c1") / ".tmp-train-1-1"  # an interrupted build
    stale.mkdir(parents=True)
    a = {s: load_split(cfg, s, tmp_path / "c1") for s in ("train", "dev", "test", "unlabeled")}
    assert [len(a[s]) for s in ("train", "dev", "test", "unlabeled")] == [8, 3, 3, 5]
    assert not stale.exists()
    spk = {s: {u.speaker for u in a[s]} for s in a}
    assert len(spk["train"]) == 3
    assert not spk["train"] & spk["dev"] and not spk["train"] & spk["test"] and not spk["dev"] & spk["test"]
    assert not spk["unlabeled"] & (spk["dev"] | spk["test"])
    for u in a["train"]:
        assert 1 <= len(u.text.split()) <= 12 and u.text == normalize_text(u.text)
        assert 0.5 < u.duration_s <= 6.0
    wav = read_audio(a["train"][0].path)
    assert abs(len(wav) / 16000 - a["train"][0].duration_s) < 1e-3 and 0.05 < np.abs(wav).max() < 1.0
    # same seed, fresh cache dir: same texts and the same audio bytes
    cfg.mini.workers = 2
    for s in ("train", "test"):
        assert _digest(load_split(cfg, s, tmp_path / "c2")) == _digest(a[s])
    # reused, not rebuilt: same paths
    assert load_split(cfg, "dev", tmp_path / "c1") == a["dev"]
    # another seed: another corpus
    cfg.seed = 1
    assert [u.text for u in load_split(cfg, "test", tmp_path / "c1")] != [u.text for u in a["test"]]
    assert config_fingerprint(cfg, "test") != config_fingerprint(_tiny_mini(), "test")


def test_manifest_encodings(tmp_path):
    sf.write(tmp_path / "a.wav", _tone(0.5, 16000), 16000)
    header = "utt_id\taudio\ttext\n"
    cases = {"latin1.tsv": (header + "u1\ta.wav\tCaf\u00e9\n").encode("latin-1"),
             "bom.tsv": b"\xef\xbb\xbf" + (header + "u1\ta.wav\tCaf\u00e9\r\n").encode()}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=r"is not UTF-8 text \(byte 0xe9 on line 2\): save it as UTF-8"):
        load_split(data_config({"name": "t", "kind": "manifest", "manifest": str(tmp_path / "latin1.tsv")}), "dev", tmp_path)
    (u,) = load_split(data_config({"name": "t", "kind": "manifest", "manifest": str(tmp_path / "bom.tsv")}), "dev",
                      tmp_path)
    assert (u.utt_id, u.text) == ("u1", "CAFE")
