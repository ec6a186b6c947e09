"""The SUPERB tasks beyond ASR (pr, ks, sid, ic): phone labels, the pooled head, class checks, the offline
variants through the real CLI on tiny corpora, the real-data variants on tiny fixtures in the data sets'
own layouts, and their bad-input errors."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import run_cli
from qspeech.data.labeled import LabeledUtterance, check_classes
from qspeech.data.phonemes import CMU_PHONES, ESPEAK_TO_CMU, espeak_phonemes, phonemize
from qspeech.errors import DataError

SMOKE = ["experiment=smoke", "train.num_threads=1"]
TINY_CORPUS = ["task.corpus.n_train=36", "task.corpus.n_dev=12", "task.corpus.n_test=12",
               "task.corpus.train_speakers=4", "task.corpus.dev_speakers=2", "task.corpus.test_speakers=2"]


def _results(root: Path):
    return {r["task"]: r for r in (json.loads(p.read_text()) for p in sorted((root / "outputs").rglob("result.json")))}


# ----------------------------------------------------------------------------------------------- labels
def test_every_espeak_phoneme_of_every_accent_maps_to_the_39_cmu_phones():
    from qspeech.data.espeak import english_accents
    from qspeech.data.mini import make_sentence

    assert len(CMU_PHONES) == 39 and all(p in CMU_PHONES for v in ESPEAK_TO_CMU.values() for p in v)
    for accent in english_accents():
        for i in range(40):
            text = make_sentence(random.Random(i), 3, 10, 2000)
            for tok in espeak_phonemes(text, accent.lower()):
                assert tok in ESPEAK_TO_CMU, (tok, text, accent)


def test_phonemize_knows_the_words():
    assert phonemize("the cat sat", "en-us") == ["DH", "AH", "K", "AE", "T", "S", "AE", "T"]
    assert phonemize("ship", "en-gb-x-rp") == ["SH", "IH", "P"]


def test_an_utterance_without_phonemes_is_refused():
    from qspeech.data.corpus import Utterance
    from qspeech.tasks.pr import PRConfig, phone_targets

    utt = Utterance("u1", "/x/u1.flac", "", "s", 1.0)
    with pytest.raises(DataError, match="u1 .* has no phonemes"):
        phone_targets(PRConfig(labels="lexicon"), [utt], {"HELLO": ["HH", "AH", "L", "OW"]})
    with pytest.raises(DataError, match="word 'WORLD' of u1 is not in the lexicon"):
        phone_targets(PRConfig(labels="lexicon"), [Utterance("u1", "/x", "HELLO WORLD", "s", 1.0)],
                      {"HELLO": ["HH", "AH", "L", "OW"]})


def test_lexicon_reader_drops_stress_and_keeps_the_first_pronunciation(tmp_path):
    from qspeech.tasks.pr import read_lexicon

    (tmp_path / "lex.txt").write_text("READ R IY1 D\nREAD R EH1 D\nA\tAH0\n")
    assert read_lexicon([str(tmp_path / "lex.txt")]) == {"READ": ["R", "IY", "D"], "A": ["AH"]}
    with pytest.raises(DataError, match="pronunciation lexicon not found"):
        read_lexicon([str(tmp_path / "nope.txt")])


# ----------------------------------------------------------------------------------------------- head
def test_pooled_head_equals_the_recipe_head_on_frames():
    # mean pooling commutes with the weighted sum and the first Linear: pooled == frame-level, exactly
    from qspeech.tasks.utterance import PooledHead, UtteranceConfig, pool_hidden_states

    torch.manual_seed(0)
    head = PooledHead(4, 16, [5, 3], UtteranceConfig(name="t", kind="t"))
    with torch.no_grad():
        head.featurizer.weights.normal_()
    hs, lens = torch.randn(3, 9, 4, 16), torch.tensor([9, 4, 1])
    for a, b in zip(head(pool_hidden_states(hs, lens)), head.frames_forward(hs, lens)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # padding frames do not count
    hs2 = hs.clone()
    hs2[1, 4:] = 1e3
    torch.testing.assert_close(pool_hidden_states(hs2, lens), pool_hidden_states(hs, lens))


def test_class_checks_name_the_missing_class():
    u = lambda i, label: LabeledUtterance(f"u{i}", "/x", label, "s", 1.0)  # noqa: E731
    splits = {"train": [u(0, "a"), u(1, "b")], "dev": [u(2, "a")], "test": [u(3, "c")]}
    with pytest.raises(DataError, match="class 'c' of the test split is absent from the train split"):
        check_classes(splits)
    with pytest.raises(DataError, match="class 'c' is absent from the train split"):
        check_classes({**splits, "test": [u(3, "a")]}, ["a", "b", "c"])
    assert check_classes({"train": [u(0, "x;1"), u(1, "y;2")], "dev": [u(2, "x;2")]}, slot_sep=";") == \
        ["0:x", "0:y", "1:1", "1:2"]


# ----------------------------------------------------------------------------------------------- offline CLI
@pytest.mark.parametrize("task,metric,classes", [("ks_small", "acc", [12]), ("sid_small", "acc", [4]),
                                                  ("ic_small", "acc", None), ("pr_small", "per", None)])
def test_offline_task_runs_through_the_cli(tmp_path, task, metric, classes):
    proc = run_cli("run", *SMOKE, f"task={task}", *(TINY_CORPUS if task != "pr_small" else []), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [r] = _results(tmp_path).values()
    m = r["metrics"]
    assert r["status"] == "ok" and r["task"] == task and r["metric"] == metric and 0 <= r["value"] <= 100
    assert m["higher_is_better"] is (metric == "acc") and m["steps"] == 6 and len(m["layer_weights"]) == 7
    if classes is not None:
        assert m["n_classes"] == classes  # ks: 10 keywords + unknown + silence; sid: one per train voice
    if task == "ic_small":
        assert len(m["n_classes"]) == 3  # action, object, location
    if task == "pr_small":
        assert "dev_per" in m and "dev_wer" not in m
    else:
        [run_dir] = [p.parent for p in (tmp_path / "outputs").rglob("result.json")]
        preds = (run_dir / "test_predictions.tsv").read_text().splitlines()
        assert preds[0] == "utt_id\tlabel\tpredicted" and len(preds) == 13


# ----------------------------------------------------------------------------------------------- real layouts
def _wav(path: Path, seconds: float = 0.5, seed: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1
    sf.write(path, x, 16000)


def make_speech_commands(root: Path, drop_train_class: str | None = None) -> Path:
    """Speech Commands v1.0's layout: words in folders, validation/testing lists, background noise, and the
    separate test set with its 12 class folders."""
    from qspeech.data.superb_sets import KS_KEYWORDS

    base = root / "speech_commands_v0.01"
    val, test = [], []
    for k, word in enumerate((*KS_KEYWORDS, "bed", "marvin")):
        for spk in range(3):
            rel = f"{word}/spk{spk}_nohash_0.wav"
            if word == drop_train_class and spk < 2:
                continue
            _wav(base / rel, seed=k * 10 + spk)
            (val if spk == 2 else test if spk == 1 and word == "bed" else []).append(rel)
    (base / "validation_list.txt").write_text("\n".join(val) + "\n")
    (base / "testing_list.txt").write_text("\n".join(test) + "\n")
    _wav(base / "_background_noise_" / "white_noise.wav", seconds=3.0, seed=99)
    for k, cls in enumerate((*KS_KEYWORDS, "_unknown_", "_silence_")):
        _wav(root / "speech_commands_test_set_v0.01" / cls / f"t{k}_nohash_0.wav", seed=200 + k)
    return root


def make_voxceleb1(root: Path) -> Path:
    lines = []
    for s in range(3):
        for n in range(4):
            rel = f"id1000{s}/yt{s}/0000{n}.wav"
            _wav(root / "wav" / rel, seed=s * 10 + n)
            lines.append(f"{1 if n < 2 else 2 if n == 2 else 3} {rel}")
    (root / "iden_split.txt").write_text("\n".join(lines) + "\n")
    return root


def make_fluent(root: Path) -> Path:
    intents = [("activate", "lights", "kitchen"), ("deactivate", "music", "none"), ("bring", "socks", "none")]
    for split in ("train", "valid", "test"):
        rows = [",path,speakerId,transcription,action,object,location"]
        for k, (a, o, loc) in enumerate(intents):
            for spk in range(2 if split == "train" else 1):
                rel = f"wavs/speakers/s{spk}/{split}-{k}.wav"
                _wav(root / rel, seed=k * 7 + spk)
                rows.append(f"{len(rows)},{rel},s{spk},text {k},{a},{o},{loc}")
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "data" / f"{split}_data.csv").write_text("\n".join(rows) + "\n")
    return root


def test_real_splits_from_fixtures(tmp_path):
    from qspeech.data.superb_sets import load_real_split

    sc = make_speech_commands(tmp_path / "sc")
    train = load_real_split("speech_commands", sc, "train")
    labels = {u.label for u in train}
    assert "_unknown_" in labels and "_silence_" in labels and "marvin" not in labels and len(labels) == 12
    assert sum(u.label == "_silence_" for u in train) == 2  # 3 s of noise: segments 1, 2 (segment 0 is dev)
    assert len(load_real_split("speech_commands", sc, "test")) == 12
    vox = make_voxceleb1(tmp_path / "vox")
    assert [len(load_real_split("voxceleb1", vox, s)) for s in ("train", "dev", "test")] == [6, 3, 3]
    fsc = make_fluent(tmp_path / "fsc")
    assert load_real_split("fluent_speech_commands", fsc, "dev")[0].label == "activate;lights;kitchen"


@pytest.mark.parametrize("task,maker", [("ks", make_speech_commands), ("sid", make_voxceleb1), ("ic", make_fluent)])
def test_real_data_tasks_run_through_the_cli(tmp_path, task, maker):
    root = maker(tmp_path / "data")
    proc = run_cli("run", *SMOKE, f"task={task}", f"data.root={root}", "train.max_steps=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [r] = _results(tmp_path).values()
    assert r["status"] == "ok" and r["metric"] == "acc" and r["metrics"]["steps"] == 4


def test_pr_on_a_librispeech_layout_with_a_lexicon(tmp_path):
    root = tmp_path / "LibriSpeech"
    words = {"HELLO": "HH AH0 L OW1", "WORLD": "W ER1 L D", "GO": "G OW1"}
    for subset, spk in (("train-clean-100", "1"), ("dev-clean", "2"), ("test-clean", "3")):
        d = root / subset / spk / "10"
        lines = []
        for n, text in enumerate(("HELLO WORLD", "GO GO", "WORLD HELLO GO")):
            _wav(d / f"{spk}-10-000{n}.flac", seed=n)
            lines.append(f"{spk}-10-000{n} {text}")
        (d / f"{spk}-10.trans.txt").write_text("\n".join(lines) + "\n")
    lex = tmp_path / "lexicon.txt"
    lex.write_text("".join(f"{w} {p}\n" for w, p in words.items()))
    proc = run_cli("run", *SMOKE, "task=pr", f"data.root={root}", f"task.lexicon=[{lex}]", "train.max_steps=4",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [r] = _results(tmp_path).values()
    assert r["metric"] == "per" and r["metrics"]["higher_is_better"] is False and r["metrics"]["n_test"] == 3


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case,needle", [
    ("no_root", "data.root is not set"),
    ("missing_root", "is not a folder"),
    ("no_label_file", "validation_list.txt not found"),
    ("class_absent", "class 'go' of the dev split is absent from the train split"),
    ("no_test_set", "the test set folder not found"),
])
def test_bad_real_data_is_one_line_exit_2(tmp_path, case, needle):
    root = make_speech_commands(tmp_path / "sc", drop_train_class="go" if case == "class_absent" else None)
    if case == "no_label_file":
        (root / "speech_commands_v0.01" / "validation_list.txt").unlink()
    if case == "no_test_set":
        import shutil

        shutil.rmtree(root / "speech_commands_test_set_v0.01")
    arg = {"no_root": [], "missing_root": [f"data.root={tmp_path / 'nope'}"]}.get(case, [f"data.root={root}"])
    proc = run_cli("run", *SMOKE, "task=ks", *arg, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert needle in lines[-1] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    # nothing lost: the data set is untouched
    assert (root / "speech_commands_v0.01" / "_background_noise_" / "white_noise.wav").is_file()
