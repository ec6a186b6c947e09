"""The kill/resume matrix (issue 15), slow: the real `qspeech run` is killed with SIGKILL at points inside
every stage a run goes through (corpus synthesis, feature caching, head training, test evaluation, export,
QAT distillation), the same command is rerun after each kill, and the run that finally finishes must equal
an uninterrupted run of the same command exactly: result.json (WER, CER, dev numbers, layer weights,
storage, MACs, ...), the predictions, the metrics history and cost.json byte for byte, the packed upstream
by content (safetensors writes its metadata map in a per-process order), and the head's tensors. Every kill leaves a stale run-folder lock that the rerun must take over, and a copy of
an earlier finished run in the same outputs folder must stay byte-identical.

Each kill is triggered by what the process writes (a temporary corpus or feature folder, a checkpoint, a
predictions file, a progress line) and is then checked against the files it left: a kill that came too
late for its stage fails the test instead of passing silently. The kills of one scenario are chained
(each rerun is killed at the next point) so that one command is resumed up to eight times.

    pytest -m slow tests/test_kill_resume.py       # ~5 min on the 2-core machine
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

pytestmark = pytest.mark.slow

EXE = Path(sys.executable).parent / "qspeech"
# Tiny, but with numbers that depend on every step: 6 head steps at lr 0.02 leave a head whose test CER
# (~96 %) and non-empty predictions move with any change of the weights; rtn 2 bit and export make the
# storage / packed-file columns real; bit at 1 bit distils two stages (FP -> 2 bit -> 1 bit).
COMMON = ["experiment=smoke", "train.num_threads=1", "cost.seconds=1", "export=true", "train.max_steps=6",
          "train.eval_every=3", "train.log_every=2", "task.lr=0.02"]
PTQ = [*COMMON, "quant=rtn", "bits=2"]
QAT = [*COMMON, "quant=bit", "bits=1", "quant.steps=6", "quant.ckpt_every=3", "quant.log_every=1"]
TIMEOUT_S = 420  # one invocation, on a loaded 2-core machine

# result.json fields that legitimately differ between an uninterrupted and a resumed run: clocks, the
# commit (others may commit meanwhile), paths under the test's own folders, and how much this invocation
# had to do (cache hit, resumed step)
VOLATILE = {"started", "finished", "timings", "git_commit", "packed_path"}
VOLATILE_METRICS = {"train_wall_s", "upstream_utts_per_s", "train_utts_per_s", "feature_cache", "resumed_from_step"}
BYTE_EQUAL = ["test_predictions.tsv", "metrics.csv", "cost.json"]
# safetensors writes its __metadata__ map in a per-process hash order, so two runs' packed files are compared
# by content: the same metadata and bit-identical tensors
PACKED = "upstream.packed.safetensors"


# ------------------------------------------------------------------------------------------ harness
class Invocation:
    """One `qspeech run` in `cwd` with QSPEECH_CACHE=`cache`; stdout and stderr read in the background."""

    def __init__(self, cwd: Path, cache: Path, args: list[str]):
        env = {**os.environ, "QSPEECH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([str(EXE), "run", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.t0 = time.time()
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 1 << 16):
            self._chunks.append(chunk)

    @property
    def text(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def children(self) -> list[int]:
        """Its child processes (corpus synthesis workers), read before a kill: they outlive it."""
        kids = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            try:
                kids += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                pass
        return kids

    def finish(self, timeout: float = TIMEOUT_S) -> int:
        rc = self.proc.wait(timeout)
        self.wall_s = time.time() - self.t0
        self._reader.join(10)
        return rc


@dataclass
class Where:
    """The files of one scenario: its working folder (outputs/) and cache; `before` is what existed when the
    current invocation started (a trigger looks for files that are new)."""

    cwd: Path
    cache: Path
    other_run: str  # the earlier result copied into outputs/run (not this experiment's folder)
    before: set = field(default_factory=set)

    def entries(self, pattern: str, root: Path | None = None) -> list[Path]:
        """Matches under root (the cache by default), never inside the earlier run's copy."""
        return sorted(p for p in (root or self.cache).glob(pattern) if self.other_run not in p.parts)

    def snapshot(self) -> set:
        out = set()
        for pattern in PATTERNS:
            for p in self.entries(pattern, self.cwd if pattern.startswith("outputs") else None):
                try:
                    out.add((str(p), p.stat().st_ino))
                except OSError:
                    pass
        return out

    def new(self, pattern: str) -> list[Path]:
        """Entries matching `pattern` that appeared (or were replaced) since the invocation started."""
        root = self.cwd if pattern.startswith("outputs") else self.cache
        found = []
        for p in self.entries(pattern, root):
            try:
                if (str(p), p.stat().st_ino) not in self.before:
                    found.append(p)
            except OSError:
                pass
        return found

    @property
    def run_dir(self) -> Path | None:
        dirs = [d for d in (self.cwd / "outputs" / "run").glob("*") if d.name != self.other_run]
        assert len(dirs) <= 1, dirs
        return dirs[0] if dirs else None

    def run_file(self, name: str) -> Path | None:
        return self.run_dir / name if self.run_dir else None

    def complete_features(self) -> list[Path]:
        return [d for d in self.entries("features/*") if not d.name.startswith(".") and (d / "meta.json").is_file()]


PATTERNS = ["corpora/*/.tmp-*", "corpora/*/train", "corpora/*/dev", "corpora/*/test", "features/.tmp-*",
            "features/*", "runs/*/last.pt", "quant/*.pt", "outputs/run/*/quant_ckpt/*.pt",
            "outputs/run/*/test_predictions.tsv"]


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def no_result(w: Where) -> None:
    assert w.run_dir is not None and not (w.run_dir / "result.json").exists(), "the run had finished"
    assert not (w.run_dir / "result.last_failure.json").exists()


@dataclass
class KillPoint:
    stage: str
    point: str
    trigger: Callable[[Where, str], bool]  # (files, output so far) -> kill now
    reached: Callable[[Where, str], None]  # asserts, on the files the killed run left, that it was there


def first_step_line(text: str, desc: str) -> int | None:
    """The step of the first progress line of `desc` (e.g. 'asr asr_small') in an invocation's output."""
    for line in text.splitlines():
        if line.startswith(f"{desc}: step "):
            return int(line.split("step ")[1].split("/")[0])
    return None


# ------------------------------------------------------------------------------------------ kill points
def _corpus_train(w, _):
    assert w.entries("corpora/*/.tmp-train-*") and not w.entries("corpora/*/train"), "not inside train synthesis"


def _corpus_dev(w, _):
    assert w.entries("corpora/*/train") and w.entries("corpora/*/.tmp-dev-*") and not w.entries("corpora/*/dev")


def _features_first(w, _):
    assert w.entries("features/.tmp-*") and not w.complete_features(), "not inside the first feature split"


def _features_second(w, _):
    assert len(w.complete_features()) == 1 and w.entries("features/.tmp-*"), "not inside the second split"


def _head_ckpt(w, _):
    [last] = w.entries("runs/*/last.pt")
    assert ckpt_step(last) == 3
    no_result(w)


def _head_between(w, text):
    [last] = w.entries("runs/*/last.pt")
    # step 4 was trained and logged but the resumable state is step 3's: the rerun must replay step 4
    assert ckpt_step(last) == 3 and "asr asr_small: step 4/6" in text
    no_result(w)


def _evaluation(w, _):
    [last] = w.entries("runs/*/last.pt")
    assert ckpt_step(last) == 6, "training had not finished"
    assert not w.run_file("test_predictions.tsv").exists(), "the test split had already been evaluated"
    no_result(w)


def _export(w, _):
    assert w.run_file("test_predictions.tsv").exists()
    no_result(w)


PTQ_POINTS = [
    KillPoint("corpus synthesis", "inside the train split", lambda w, t: bool(w.new("corpora/*/.tmp-train-*")),
              _corpus_train),
    KillPoint("corpus synthesis", "train done, inside dev", lambda w, t: bool(w.new("corpora/*/.tmp-dev-*")),
              _corpus_dev),
    KillPoint("feature caching", "inside the first split", lambda w, t: bool(w.new("features/.tmp-*")),
              _features_first),
    KillPoint("feature caching", "one split cached, inside the next",
              lambda w, t: len(w.complete_features()) == 1 and bool(w.new("features/.tmp-*")), _features_second),
    KillPoint("head training", "right after the step-3 checkpoint", lambda w, t: bool(w.new("runs/*/last.pt")),
              _head_ckpt),
    KillPoint("head training", "step 4 done, not checkpointed", lambda w, t: "asr asr_small: step 4/6" in t,
              _head_between),
    KillPoint("evaluation", "after the last checkpoint, before test predictions",
              lambda w, t: bool(w.new("runs/*/last.pt")), _evaluation),
    KillPoint("export", "predictions written, before result.json",
              lambda w, t: bool(w.new("outputs/run/*/test_predictions.tsv")), _export),
]


def _qat_stage0(w, _):
    [s0] = w.entries("outputs/run/*/quant_ckpt/stage0_b2.pt", w.cwd)
    assert ckpt_step(s0) == 3 and not w.entries("outputs/run/*/quant_ckpt/stage1_*", w.cwd)
    assert not w.entries("quant/*.pt")
    no_result(w)


def _qat_stage1(w, text):
    [s0] = w.entries("outputs/run/*/quant_ckpt/stage0_b2.pt", w.cwd)
    [s1] = w.entries("outputs/run/*/quant_ckpt/stage1_b1.pt", w.cwd)
    # the finished 2-bit stage is cached (a 2-bit run would load it), the 1-bit upstream is not
    assert ckpt_step(s0) == 6 and ckpt_step(s1) == 3
    assert [p.name.rsplit("_", 2)[1] for p in w.entries("quant/*.pt")] == ["b2"]
    assert "resuming distillation stage 0 at step 3" in text  # this invocation resumed the killed stage 0
    no_result(w)


def _qat_done(w, text):
    assert w.entries("quant/*.pt") and not w.complete_features()
    assert "resuming distillation stage 1 at step 3" in text
    no_result(w)


QAT_POINTS = [
    KillPoint("QAT distillation", "stage 0 (2 bit), after its step-3 checkpoint",
              lambda w, t: bool(w.new("outputs/run/*/quant_ckpt/stage0_b2.pt")), _qat_stage0),
    KillPoint("QAT distillation", "stage 0 done, stage 1 (1 bit) after its step-3 checkpoint",
              lambda w, t: bool(w.new("outputs/run/*/quant_ckpt/stage1_b1.pt")), _qat_stage1),
    KillPoint("QAT distillation", "distilled upstream cached, before feature caching",
              lambda w, t: bool(w.new("quant/*.pt")), _qat_done),
]


def kill_at(w: Where, args: list[str], point: KillPoint, orphans: list[int]) -> Invocation:
    """Start the command, SIGKILL it as soon as `point.trigger` holds, check that it was at that point."""
    w.before = w.snapshot()
    inv = Invocation(w.cwd, w.cache, args)
    t0 = time.time()
    try:
        while not point.trigger(w, inv.text):
            if inv.proc.poll() is not None:
                pytest.fail(f"{point.stage} / {point.point}: the run ended (rc {inv.proc.returncode}) before the "
                            f"kill point\n{inv.text[-3000:]}")
            if time.time() - t0 > TIMEOUT_S:
                pytest.fail(f"{point.stage} / {point.point}: not reached in {TIMEOUT_S} s\n{inv.text[-3000:]}")
            time.sleep(0.02)
        orphans += inv.children()
        inv.proc.send_signal(signal.SIGKILL)
    finally:
        if inv.proc.poll() is None:  # killed above, or the test failed: never leave it running
            inv.proc.kill()
        rc = inv.finish()
    assert rc == -signal.SIGKILL, (rc, inv.text[-3000:])
    try:
        point.reached(w, inv.text)
    except AssertionError as e:
        raise AssertionError(f"killed too late or too early for {point.stage} / {point.point}: {e}\n"
                             f"{inv.text[-3000:]}") from None
    # the killed run's lock line stays behind: a stale lock the next run must take over
    assert (w.run_dir / ".qspeech.lock").read_text().startswith(f"{inv.pid} ")
    return inv


def assert_took_over(w: Where, text: str, killed_pid: int) -> None:
    assert "in use by another qspeech run" not in text
    assert f"took over {w.run_dir} from a run that stopped without finishing ({killed_pid} " in text, text[-3000:]


def run_to_end(w: Where, args: list[str]) -> Invocation:
    inv = Invocation(w.cwd, w.cache, args)
    try:
        rc = inv.finish()
    finally:
        if inv.proc.poll() is None:
            inv.proc.kill()
            inv.proc.wait()
    assert rc == 0, inv.text[-3000:]
    return inv


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def comparable(result: dict) -> dict:
    out = {k: v for k, v in result.items() if k not in VOLATILE}
    out["config"] = {k: v for k, v in out["config"].items() if k != "cache_dir"}
    out["metrics"] = {k: v for k, v in out["metrics"].items() if k not in VOLATILE_METRICS}
    return out


def assert_same_packed(a: Path, b: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), f"packed tensor {k} differs"


def assert_same_run(base: Path, resumed: Path) -> None:
    """The resumed run's folder equals the uninterrupted one's in every number and output."""
    a, b = (json.loads((d / "result.json").read_text()) for d in (base, resumed))
    assert a["status"] == b["status"] == "ok"
    assert comparable(a) == comparable(b)
    for name in BYTE_EQUAL:
        assert (base / name).read_bytes() == (resumed / name).read_bytes(), f"{name} differs"
    assert_same_packed(base / PACKED, resumed / PACKED)
    ha, hb = (torch.load(d / "downstream.pt", map_location="cpu", weights_only=True) for d in (base, resumed))
    assert ha["best_step"] == hb["best_step"] and ha["model"].keys() == hb["model"].keys()
    for k in ha["model"]:
        assert torch.equal(ha["model"][k], hb["model"][k]), f"head tensor {k} differs"
    if (base / "quant_distill.json").exists():
        qa, qb = (json.loads((d / "quant_distill.json").read_text()) for d in (base, resumed))
        keep = ("stage", "bits", "steps", "loss_first", "loss_last")
        assert [{k: s[k] for k in keep} for s in qa["stages"]] == [{k: s[k] for k in keep} for s in qb["stages"]]


# ------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """Both commands run once each, uninterrupted, in one folder and cache: {args key: run folder}."""
    root = tmp_path_factory.mktemp("baseline")
    w = Where(root, root / "cache", other_run="")
    folders = {}
    for name, args in (("ptq", PTQ), ("qat", QAT)):
        before = set((root / "outputs" / "run").glob("*")) if (root / "outputs" / "run").exists() else set()
        run_to_end(w, args)
        [folder] = set((root / "outputs" / "run").glob("*")) - before
        folders[name] = folder
    # the numbers this test compares must not be trivial: a head that predicts nothing scores CER 100
    res = json.loads((folders["ptq"] / "result.json").read_text())
    assert res["metrics"]["cer"] < 100 and res["storage_mb"] < 10
    return root, folders


def _scenario(tmp_path, baseline, name: str, args: list[str], points: list[KillPoint], seed_corpus: bool):
    root, folders = baseline
    w = Where(tmp_path, tmp_path / "cache", other_run=folders[name].name + "-earlier")
    earlier = tmp_path / "outputs" / "run" / w.other_run  # an earlier finished run beside this one
    shutil.copytree(folders[name], earlier)
    earlier_bytes = tree_bytes(earlier)
    if seed_corpus:  # QAT: the corpus as a finished earlier run left it (corpus kills are the PTQ scenario's)
        shutil.copytree(root / "cache" / "corpora", w.cache / "corpora")
    orphans: list[int] = []
    kept: dict[str, int] = {}  # what earlier invocations completed, by inode: it must not be rebuilt
    try:
        killed = []
        for point in points:
            inv = kill_at(w, args, point, orphans)
            if killed:
                assert_took_over(w, inv.text, killed[-1].pid)
            killed.append(inv)
            for p in [*w.entries("corpora/*/train"), *w.entries("corpora/*/dev"), *w.complete_features()]:
                kept.setdefault(str(p), p.stat().st_ino)
        final = run_to_end(w, args)
        assert_took_over(w, final.text, killed[-1].pid)
        for point, inv in zip(points, killed):  # the matrix, with -s
            print(f"{name}: killed after {inv.wall_s:5.1f} s in {point.stage}: {point.point}")
        print(f"{name}: the last rerun finished in {final.wall_s:.1f} s")
    finally:
        for pid in orphans:  # synthesis workers of a killed run finish their shard and exit on their own
            deadline = time.time() + 60
            while Path(f"/proc/{pid}").exists() and time.time() < deadline:
                time.sleep(0.2)
            with contextlib.suppress(OSError):  # still our worker (not a reused pid): stop it
                if b"qspeech.data.mini" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)

    assert_same_run(folders[name], w.run_dir)
    assert (w.run_dir / ".qspeech.lock").read_text() == ""  # released by the finished run
    assert [p.name for p in w.cwd.rglob("result*.json")] == ["result.json", "result.json"]
    assert tree_bytes(earlier) == earlier_bytes, "an earlier result was changed"
    for path, ino in kept.items():  # finished work of killed runs was reused, not rebuilt
        assert Path(path).stat().st_ino == ino, f"{path} was rebuilt"
    leftovers = w.entries("corpora/*/.tmp-*") + w.entries("features/.tmp-*")
    assert not leftovers, f"temporary folders of killed runs left behind: {leftovers}"
    return w, killed, final


def test_ptq_run_killed_in_every_stage_resumes_to_identical_numbers(tmp_path, baseline):
    """rtn 2 bit from an empty cache, killed 8 times: twice in corpus synthesis, twice in feature caching,
    twice in head training, once in test evaluation, once between the predictions and result.json."""
    w, killed, final = _scenario(tmp_path, baseline, "ptq", PTQ, PTQ_POINTS, seed_corpus=False)
    texts = [k.text for k in killed[1:]] + [final.text]  # the invocations after the first kill, in order
    # each rerun went on from the killed one's state: the head started at step 1 once (first line: step 2),
    # resumed at step 3 twice (replaying step 4 the second time) and was not retrained by the last two
    desc = "asr asr_small"
    assert [first_step_line(t, desc) for t in texts[3:]] == [2, 4, 4, None, None]
    assert json.loads((w.run_dir / "result.json").read_text())["metrics"]["resumed_from_step"] == 6


def test_qat_run_killed_in_distillation_resumes_to_identical_numbers(tmp_path, baseline):
    """bit 1 bit (FP -> 2 bit -> 1 bit), killed inside each distillation stage and after the distilled
    upstream was cached; the last invocation loads it from the cache."""
    w, killed, final = _scenario(tmp_path, baseline, "qat", QAT, QAT_POINTS, seed_corpus=True)
    assert "loaded distilled bit 1-bit upstream from" in final.text
    assert "distill bit 2-bit: step" not in final.text and "distill bit 1-bit: step" not in final.text
