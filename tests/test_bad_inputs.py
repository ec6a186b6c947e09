"""Bad input never becomes a traceback: config values and types, checkpoints, audio, manifests, file-system
faults, concurrent runs and CLI misuse each give exit code 2 and one line on stderr (or the documented
skip), and never change an earlier run's results. The CLI runs in-process (`qspeech.cli.main`): a
subprocess costs ~3 s of start-up per case on the 2-core machine, in-process ~0.3 s."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import ROOT

ASSETS = ROOT / "qspeech" / "assets"
SMOKE = ("experiment=smoke", "cost.seconds=1")  # 1 s of audio for the MAC count: cheaper, same checks


# ------------------------------------------------------------------------------------------ harness
@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [ln for ln in self.err.replace("\r", "\n").splitlines() if ln.strip()]


def _drop_handlers() -> None:
    """Hydra's logging config points handlers at the redirected streams and the run's log file: remove
    them, as the end of a process would (pytest's own capture handlers stay)."""
    for lg in [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger))]:
        for h in list(lg.handlers):
            if type(h).__module__ == "logging":
                lg.removeHandler(h)
                h.close()


def _print_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def qspeech(*argv: str) -> Outcome:
    """`qspeech argv...` in this process: exit code, stdout, stderr. Warnings print to stderr as in a fresh
    process (pytest would otherwise collect them), so 'one line on stderr' means what a user sees."""
    from qspeech.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for cat in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", cat)
        warnings.showwarning = _print_warning  # pytest records them otherwise
        try:
            main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            _drop_handlers()
    return Outcome(code, out.getvalue(), err.getvalue())


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every result file under root. Not results: logs, the lock file, and Hydra's record of the latest
    command line (.hydra/, rewritten by every start of the same experiment, e.g. with another cache_dir)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix != ".log" and p.name != ".qspeech.lock" and ".hydra" not in p.parts}


@dataclass
class Workspace:
    """A folder holding one finished smoke run (the 'earlier results') and the smoke corpus as manifests."""

    root: Path
    run_dir: Path
    before: dict[str, bytes]
    corpus: dict[str, list]  # split -> Utterances of the smoke corpus

    def unchanged(self) -> None:
        now = _snapshot(self.root / "outputs")
        changed = [k for k, v in self.before.items() if now.get(k) != v]
        assert not changed, f"earlier results changed: {changed}"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QSPEECH_CACHE", str(tmp_path_factory.getbasetemp() / "qspeech-cache"))
        mp.chdir(root)
        first = qspeech("run", *SMOKE)
        assert first.code == 0, first.err
        (result,) = (root / "outputs").rglob("result.json")
        from qspeech.data import data_config, load_split

        data = data_config(json.loads(result.read_text())["config"]["data"])
        corpus = {s: load_split(data, s, os.environ["QSPEECH_CACHE"]) for s in ("train", "dev", "test")}
    return Workspace(root, result.parent, _snapshot(root / "outputs"), corpus)


@pytest.fixture
def at(ws, monkeypatch):
    """Run cases from the workspace (the earlier results' outputs/), with the session's cache."""
    monkeypatch.chdir(ws.root)
    return ws


def refused(ws: Workspace, *argv: str, needle: str = "") -> str:
    """The case's contract: exit 2, one 'qspeech: error:' line on stderr, no traceback, earlier results
    byte-identical. Returns the line."""
    got = qspeech(*argv)
    assert got.code == 2, got.err[-2000:]
    assert "Traceback" not in got.err and "HYDRA_FULL_ERROR" not in got.err, got.err
    assert len(got.err_lines) == 1 and got.err_lines[0].startswith("qspeech: error: "), got.err
    assert needle in got.err_lines[0], got.err_lines[0]
    ws.unchanged()
    return got.err_lines[0]


def _result_of(out: str) -> dict:
    """result.json of the run whose success line is in `out`."""
    path = out.strip().splitlines()[-1].split("-> ")[-1]
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------ config values
@pytest.mark.parametrize("args,needle", [
    (["seed=abc"], "seed=abc: must be an integer"),  # the item 1
    (["seed=1.5"], "seed=1.5: must be an integer"),
    (["train.max_steps=abc"], "train.max_steps=abc: must be an integer"),  # item 2
    (["train.max_steps=-1"], "train.max_steps=-1: must be an integer >= 1"),  # named the wrong key before
    (["train.max_steps=0"], "train.max_steps=0"),
    (["train.batch_size=2.5"], "train.batch_size=2.5: must be an integer"),
    (["train.batch_size=0"], "train.batch_size=0"),
    (["train.eval_every=-5"], "train.eval_every=-5"),
    (["train.grad_clip=abc"], "train.grad_clip=abc"),
    (["train.lr_schedule=cosine"], "train.lr_schedule=cosine"),
    (["train.cache_features=maybe"], "train.cache_features"),
    (["bits=5"], "bits=5 is not supported"),
    (["bits=abc"], "bits"),
    (["quant=nope"], "quant=nope: no such option"),
    (["model=nope"], "model=nope: no such option"),
    (["model="], "no such option"),
    (["quant.targets=linear"], "quant.targets=linear: must be a list"),
    (["quant.targets=[linear,nope]"], "nope"),
    (["quant=bit", "bits=4"], "bit"),
    (["quant=lsq", "bits=1"], "lsq"),
    (["data.kind=nope"], "data.kind=nope"),
    (["data.max_skipped=2"], "data.max_skipped=2"),
    (["data.max_skipped=abc"], "data.max_skipped=abc: must be a number"),
    (["data.mini.n_train=-3"], "data.mini.n_train=-3"),
    (["data.max_utts.train=-1"], "data.max_utts.train=-1"),
    (["data.splits.nope=x"], "data.splits.nope"),
    (["cost.seconds=-1"], "cost.seconds"),
    (["nosuchkey=1"], "nosuchkey"),
    (["train.nope=1"], "train.nope: unknown key"),
    (["quant=rtn", "quant.steps=9"], "quant.steps: unknown key"),  # a method's config has its own fields only
    (["quant=kmeans", "quant.act_bits=4"], "quant.act_bits: unknown key"),
    (["quant=lsq", "quant.clip=mse"], "quant.clip: unknown key"),
    (["-m", "seed=1,abc"], "seed=abc"),  # a sweep is refused before its first job
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_config_value(at, args, needle):
    refused(at, "run", *SMOKE, *args, needle=needle)
    assert not list((at.root / "outputs").glob("multirun*"))


# ------------------------------------------------------------------------------------------ CLI misuse
@pytest.mark.parametrize("argv,needle", [
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["run", "--nosuchflag"], "unrecognized arguments: --nosuchflag"),
    (["run", "--cfg"], "--cfg"),
    (["run", "--cfg", "nope"], "invalid choice: 'nope'"),
    (["run", "bits"], "cannot parse overrides"),
    (["run", "bits=[1,2"], "cannot parse overrides"),
    (["report", "--bogus"], "unrecognized arguments: --bogus"),
    (["export", "bits=5"], "bits=5"),
    (["bench", "bench.repeats=-1"], "bench.repeats=-1"),
    (["data", "data=manifest"], "no manifest"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_misuse(at, argv, needle):
    refused(at, *argv, needle=needle)


# ------------------------------------------------------------------------------------------ checkpoints
def _torch_file(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


class _Payload:
    """Unpickling this runs a shell command: a safe load must refuse it without running it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _asset_state() -> dict:
    return torch.load(ASSETS / "tiny_hubert.pt", map_location="cpu", weights_only=True)


def _ckpt(kind: str, tmp: Path) -> Path:
    p = tmp / f"{kind}.pt"
    if kind == "random_bytes":
        p.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("model_cfg: not a checkpoint\n")
    elif kind in ("truncated_half", "truncated_head"):
        data = (ASSETS / "tiny_hubert.pt").read_bytes()
        p.write_bytes(data[: len(data) // 2] if kind == "truncated_half" else data[:64])
    elif kind == "zip_not_torch":
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("readme.txt", "hello")
    elif kind == "tensor":
        _torch_file(p, torch.zeros(3))
    elif kind == "wrong_arch":
        return ASSETS / "tiny_distilhubert.ckpt"  # a DistilHuBERT file for model=tiny_hubert
    elif kind == "cfg_not_mapping":
        _torch_file(p, {**_asset_state(), "model_cfg": [1, 2, 3]})
    elif kind == "wrong_shapes":
        state = _asset_state()
        state["model_cfg"] = {**state["model_cfg"], "encoder_embed_dim": 128}
        _torch_file(p, state)
    elif kind == "missing_weights":
        _torch_file(p, {k: v for k, v in _asset_state().items() if k != "model_weight"})
    elif kind == "folder":
        p.mkdir()
    else:
        raise AssertionError(kind)
    return p


@pytest.mark.parametrize("kind,needle", [
    ("random_bytes", "is not a readable checkpoint"),  # was: "... pass model.trust_checkpoint=true"
    ("empty", "is not a readable checkpoint"),
    ("text", "is not a readable checkpoint"),
    ("truncated_half", "is not a readable checkpoint"),
    ("truncated_head", "is not a readable checkpoint"),
    ("zip_not_torch", "is not a readable checkpoint"),
    ("tensor", "not a dict"),
    ("wrong_arch", "is not an s3prl hubert checkpoint"),
    ("cfg_not_mapping", "model_cfg should be a mapping"),
    ("wrong_shapes", "do not fit"),
    ("missing_weights", "missing model_weight"),
    ("folder", "no such file"),
])
def test_bad_checkpoint(at, tmp_path, kind, needle):
    path = _ckpt(kind, tmp_path)
    line = refused(at, "run", *SMOKE, "model.init=pretrained", f"model.ckpt={path}", needle=needle)
    if "readable" in needle:
        assert "trust_checkpoint" not in line  # never invite turning the guard off for a corrupt file


@pytest.mark.parametrize("container", ["torch_save", "raw_pickle"])
def test_pickle_payload_is_refused_and_never_runs(at, tmp_path, container):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "payload.pt"
    if container == "torch_save":
        torch.save({"model_cfg": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    line = refused(at, "run", *SMOKE, "model.init=pretrained", f"model.ckpt={path}", needle=str(path))
    assert not marker.exists()
    if container == "torch_save":  # a well-formed file with a foreign object: the switch is named
        assert "posix.system" in line and "model.trust_checkpoint=true" in line


# ------------------------------------------------------------------------------------------ manifests, audio
def _tsv(path: Path, rows: list[tuple], header=("utt_id", "audio", "speaker", "text"), encoding="utf-8") -> Path:
    lines = ["\t".join(header)] + ["\t".join(str(x) for x in r) for r in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def _rows(utts) -> list[tuple]:
    return [(u.utt_id, u.path, u.speaker, u.text) for u in utts]


def _manifests(ws: Workspace, tmp: Path, extra: dict[str, list[tuple]] | None = None) -> list[str]:
    """data=manifest overrides for a small copy of the smoke corpus (8 / 4 / 4 utterances); `extra` rows are
    added to a split."""
    extra = extra or {}
    sizes = {"train": 8, "dev": 4, "test": 4}
    out = ["data=manifest"]
    for split, n in sizes.items():
        p = _tsv(tmp / f"{split}.tsv", _rows(ws.corpus[split][:n]) + extra.get(split, []))
        out.append(f"data.splits.{split}={p}")
    return out


def _bad_audio(kind: str, tmp: Path) -> Path:
    p = tmp / f"{kind}.wav"
    if kind == "missing":
        return p
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "corrupt":
        p.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 20)
    elif kind == "zero_samples":
        sf.write(p, np.zeros(0, np.float32), 16000)
    elif kind == "folder":
        p.mkdir()
    elif kind == "text_file":
        p.write_text("not audio\n")
    else:
        raise AssertionError(kind)
    return p


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt", "zero_samples", "folder", "text_file"])
def test_unreadable_audio_over_the_bound_fails(at, tmp_path, kind):
    """1 bad file of 5 in dev is 20 % > data.max_skipped (5 %): the run stops before training."""
    bad = _bad_audio(kind, tmp_path)
    args = _manifests(at, tmp_path, {"dev": [("bad-1", bad, "spk", "HELLO WORLD")]})
    line = refused(at, "run", *SMOKE, *args, needle="more than data.max_skipped=0.05")
    assert str(bad) in line and "1 of 5" in line


def test_unreadable_audio_under_the_bound_is_skipped_and_counted(at, tmp_path):
    """The documented skip: within data.max_skipped the run goes on, warns, and result.json counts it."""
    bad = _bad_audio("missing", tmp_path)
    args = _manifests(at, tmp_path, {"dev": [("bad-1", bad, "spk", "HELLO WORLD")]})
    got = qspeech("run", *SMOKE, *args, "data.max_skipped=0.25")
    assert got.code == 0, got.err
    assert "skipped 1 of 5" in got.err and "Traceback" not in got.err
    metrics = _result_of(got.out)["metrics"]
    assert metrics["skipped_audio"] == 1 and metrics["n_dev"] == 4
    at.unchanged()


def test_audio_unreadable_only_past_its_header_is_skipped_and_counted(at, tmp_path):
    """NaN samples pass the header check; the task skips the file when it reads it and counts it."""
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    args = _manifests(at, tmp_path, {"test": [("nan-1", nan, "spk", "HELLO WORLD")]})
    got = qspeech("run", *SMOKE, *args)
    assert got.code == 0, got.err
    assert _result_of(got.out)["metrics"]["skipped_audio"] == 1
    at.unchanged()


def _odd_audio(kind: str, src: Path, tmp: Path) -> Path:
    wav, sr = sf.read(src, dtype="float32")
    import soxr

    if kind == "8khz":
        p = tmp / "odd.wav"
        sf.write(p, soxr.resample(wav, sr, 8000), 8000)
    elif kind == "44khz_stereo":
        p = tmp / "odd.wav"
        w = soxr.resample(wav, sr, 44100)
        sf.write(p, np.stack([w, 0.5 * w], axis=1), 44100)
    elif kind == "flac_24bit":
        p = tmp / "odd.flac"
        sf.write(p, wav, sr, subtype="PCM_24")
    elif kind == "very_long":  # 60 s: the utterance repeated (the upstream's attention grows as T^2)
        p = tmp / "odd.wav"
        sf.write(p, np.tile(wav, int(np.ceil(60 * sr / len(wav))))[: 60 * sr], sr)
    else:
        raise AssertionError(kind)
    return p


@pytest.mark.parametrize("kind", ["8khz", "44khz_stereo", "flac_24bit", "very_long"])
def test_unusual_but_valid_audio_is_used(at, tmp_path, kind):
    """Any rate, channels and libsndfile format is read (mono 16 kHz); nothing is skipped."""
    src = at.corpus["test"][4]
    odd = _odd_audio(kind, Path(src.path), tmp_path)
    args = _manifests(at, tmp_path, {"test": [("odd-1", odd, src.speaker, src.text)]})
    got = qspeech("run", *SMOKE, *args)
    assert got.code == 0, got.err
    metrics = _result_of(got.out)["metrics"]
    assert metrics["skipped_audio"] == 0 and metrics["n_test"] == 5
    at.unchanged()


def _manifest_case(kind: str, ws: Workspace, tmp: Path) -> Path:
    good = _rows(ws.corpus["dev"][:4])
    p = tmp / f"{kind}.tsv"
    if kind == "no_text_column":
        return _tsv(p, [r[:3] for r in good], header=("utt_id", "audio", "speaker"))
    if kind == "latin1":  # the byte 0xE9
        return _tsv(p, good + [("x-1", good[0][1], "spk", "caf\u00e9 au lait")], encoding="latin-1")
    if kind == "empty_file":
        p.write_bytes(b"")
    elif kind == "header_only":
        return _tsv(p, [])
    elif kind == "binary":
        p.write_bytes(np.random.default_rng(1).bytes(2048))
    elif kind == "nul_bytes":
        p.write_bytes(b"utt_id\taudio\ttext\na\x00b\tc\td\n")
    elif kind == "empty_transcripts":
        return _tsv(p, [(u, a, s, "") for u, a, s, _ in good])
    elif kind == "duplicate_ids":
        return _tsv(p, good + [good[0]])
    elif kind == "rows_without_audio":
        return _tsv(p, good + [("x-1", "", "spk", "HELLO")])
    elif kind == "folder":
        p.mkdir()
    elif kind == "missing":
        pass
    else:
        raise AssertionError(kind)
    return p


@pytest.mark.parametrize("kind,needle", [
    ("no_text_column", "lacks column(s) text"),
    ("latin1", "is not UTF-8 text (byte 0xe9 on line 6)"),  # the item 3
    ("empty_file", "lacks column(s) utt_id, audio, text"),
    ("header_only", "it lists no utterances"),
    ("binary", "manifest"),
    ("nul_bytes", "no usable utterances"),
    ("empty_transcripts", "no usable utterances"),
    ("duplicate_ids", "duplicate utt_id"),
    ("rows_without_audio", "row without utt_id or audio"),
    ("folder", "manifest file not found"),
    ("missing", "manifest file not found"),
])
def test_bad_manifest(at, tmp_path, kind, needle):
    bad = _manifest_case(kind, at, tmp_path)
    args = [*_manifests(at, tmp_path), f"data.splits.dev={bad}"]
    refused(at, "run", *SMOKE, *args, needle=needle)


def test_manifest_with_byte_order_mark_and_crlf_is_read(at, tmp_path):
    rows = _rows(at.corpus["dev"][:4])
    text = "\r\n".join(["utt_id\taudio\tspeaker\ttext"] + ["\t".join(map(str, r)) for r in rows]) + "\r\n"
    tsv = tmp_path / "bom.tsv"
    tsv.write_bytes(b"\xef\xbb\xbf" + text.encode())
    got = qspeech("data", "data=manifest", f"data.manifest={tsv}")
    assert got.code == 0, got.err
    summary = json.loads(got.out[got.out.index("{"):got.out.rindex("}") + 1])
    assert summary["splits"]["dev"]["n_utts"] == 4 and summary["splits"]["dev"]["n_skipped"] == 0
    at.unchanged()


# ------------------------------------------------------------------------------------------ file system
@pytest.fixture
def a_file(tmp_path) -> Path:
    """A regular file: no folder can be made below it, even by root (tests run as root in CI)."""
    f = tmp_path / "a_file"
    f.write_text("x")
    return f


def test_outputs_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "outputs").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    got = qspeech("run", *SMOKE)
    assert got.code == 2 and len(got.err_lines) == 1 and "is a file, not a folder" in got.err, got.err
    assert (tmp_path / "outputs").read_text() == "not a folder"


@pytest.mark.parametrize("flag", ["hydra.run.dir", "hydra.sweep.dir"])
def test_run_folder_under_a_file(at, a_file, flag):
    refused(at, "run", *SMOKE, *(["-m"] if "sweep" in flag else []), f"{flag}={a_file}/run",
            needle=f"{a_file} is a file, not a folder")


def test_cfg_job_does_not_need_a_writable_output_folder(at, a_file):
    got = qspeech("run", *SMOKE, "--cfg", "job", f"hydra.run.dir={a_file}/run")
    assert got.code == 0 and "max_steps: 6" in got.out, got.err


@pytest.fixture
def read_only(monkeypatch):
    """Folders that answer 'not writable' as a read-only mount does (root can write anywhere else)."""
    import qspeech.atomic as atomic

    folders: set[Path] = set()
    real = atomic._writable

    def writable(p) -> bool:  # everything below a read-only folder is read-only, as on a read-only mount
        p = Path(p).resolve()
        return not any(f == p or f in p.parents for f in folders) and real(p)

    monkeypatch.setattr(atomic, "_writable", writable)
    return folders


def test_read_only_outputs_folder(at, read_only):
    read_only.add((at.root / "outputs").resolve())
    refused(at, "run", *SMOKE, "seed=21", needle="outputs/run is not writable")


def test_read_only_existing_run_folder(at, read_only):
    read_only.add(at.run_dir.resolve())
    refused(at, "run", *SMOKE, needle=f"{at.run_dir.name} is not writable")


@pytest.mark.parametrize("command", ["run", "data"])
def test_cache_under_a_file(at, a_file, monkeypatch, command):
    monkeypatch.setenv("QSPEECH_CACHE", str(a_file / "cache"))
    refused(at, command, *SMOKE, needle="set QSPEECH_CACHE to a writable folder")


def test_read_only_cache(at, tmp_path, monkeypatch, read_only):
    cache = tmp_path / "cache"
    cache.mkdir()
    read_only.add(cache.resolve())
    monkeypatch.setenv("QSPEECH_CACHE", str(cache))
    refused(at, "run", *SMOKE, needle=f"{cache} is not writable")


def test_disk_full_while_writing_results(at, monkeypatch):
    import qspeech.cost_command as cost_command
    import qspeech.runner as runner

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(cost_command, "write_json_atomic", full)  # cost.json, the run's first results file
    monkeypatch.setattr(runner, "write_json_atomic", full)
    refused(at, "run", *SMOKE, "seed=22", needle="No space left on device")


# ------------------------------------------------------------------------------------------ one runner per folder
def test_run_folder_held_by_a_live_run_is_refused(at):
    from qspeech.atomic import folder_lock

    with folder_lock(at.run_dir):
        refused(at, "run", *SMOKE, needle=f"pid {os.getpid()}")


def _wait_for_holder(folder_root: Path, proc, timeout=120.0) -> Path:
    t0 = time.time()
    while time.time() - t0 < timeout:
        for lock in folder_root.rglob(".qspeech.lock"):
            if lock.read_text().startswith(f"{proc.pid} "):
                return lock
        assert proc.poll() is None, "the first run ended before it took the lock"
        time.sleep(0.05)
    raise AssertionError("the first run never took the lock")


def test_two_concurrent_runs_then_kill_9_and_take_over(tmp_path, monkeypatch):
    """A second runner on the same experiment is refused with one line while the first holds the folder
    (the first is paused there with SIGSTOP, so the overlap does not depend on timing); after the first is
    killed with SIGKILL its lock is stale, and the same command takes the folder over and finishes."""
    monkeypatch.chdir(tmp_path)
    args = ["run", *SMOKE, "seed=23"]
    exe = Path(sys.executable).parent / "qspeech"
    first = subprocess.Popen([str(exe), *args], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = _wait_for_holder(tmp_path, first)
        first.send_signal(signal.SIGSTOP)
        second = qspeech(*args)
        assert second.code == 2 and len(second.err_lines) == 1, second.err
        assert f"in use by another qspeech run of the same experiment (pid {first.pid} " in second.err
        assert "Traceback" not in second.err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    assert lock.read_text().startswith(f"{first.pid} ")  # the killed run's line stays: a stale lock
    third = qspeech(*args)
    assert third.code == 0, third.err
    assert f"took over {lock.parent}" in third.out and f"{first.pid} " in third.out
    assert json.loads((lock.parent / "result.json").read_text())["status"] == "ok"
    assert lock.read_text() == ""  # released at the end
