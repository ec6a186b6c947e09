"""The scenarios of the SLURM check, run by benchmarks/slurm_check.sh against the one-node cluster it started
(SLURM_CONF points at it). Each scenario runs the real `qspeech run -m ... hydra/launcher=slurm_cpu` in its own
folder and cache, reads what SLURM says about its jobs (scontrol: there is no accounting database) and what
qspeech wrote, and compares the numbers with the same runs done locally:

  sweep      experiment=smoke bits=2,4,8,32 through SLURM: the report's four rows equal a local sweep's
  requeue    a longer training requeued mid-way with `scontrol requeue` (SLURM sends SIGTERM): the job saves
             its state, is requeued, resumes from the step it stopped at and ends with the numbers of an
             uninterrupted local run
  timeout    a training of about 120 s (sized from the baseline's speed) under a 2-minute limit (submitit's
             SIGUSR2 30 s before it): requeued at each limit until done, the numbers of the same run done locally
  failure    a run with a bad override: rejected before submission when the config says so (bits=5); a path
             the job cannot read fails the job once (no requeue) with one line in its log, failed in the report

One JSON (--out) holds the job ids, their SLURM states, restarts, exit codes, times and every check.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

QSPEECH = os.environ.get("QSPEECH") or shutil.which("qspeech", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
LAUNCHER = ["hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]
SMOKE = ["experiment=smoke", "train.num_threads=1", "cost.seconds=1"]
# A training long enough to be interrupted (one to three minutes of steps on two loaded cores), with numbers that
# move with every step (lr 0.02: the test CER and predictions depend on the weights)
LONG = [*SMOKE, "bits=2", "train.max_steps=300", "train.eval_every=50", "train.log_every=5", "task.lr=0.02"]
VOLATILE = {"started", "finished", "timings", "git_commit", "packed_path"}
VOLATILE_METRICS = {"train_wall_s", "upstream_utts_per_s", "train_utts_per_s", "feature_cache", "resumed_from_step"}
JOB_FIELDS = ("JobState", "Reason", "Restarts", "ExitCode", "RunTime", "TimeLimit", "SubmitTime", "StartTime",
              "EndTime")


# ------------------------------------------------------------------------------------------ running things
class Sweep:
    """One `qspeech run -m` (or a local run) in `folder` with its own cache; output in folder/command.log."""

    def __init__(self, folder: Path, args: list[str]):
        self.folder, self.args = folder, args
        folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "QSPEECH_CACHE": str(folder / "cache"), "OMP_NUM_THREADS": "1"}
        self.log = folder / "command.log"
        self.t0 = time.time()
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen([QSPEECH, "run", *args], cwd=folder, env=env, stdout=f,
                                         stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 1800) -> dict:
        rc = self.proc.wait(timeout)
        return {"command": "qspeech run " + " ".join(self.args), "rc": rc, "wall_s": round(time.time() - self.t0, 1)}

    @property
    def runs(self) -> Path:
        return self.folder / "outputs" / "run"

    def job_dirs(self) -> list[Path]:
        """submitit's folder of each job (outputs/run/.submitit/<array>_<task>, or <job> for a single job)."""
        return sorted(p.parent for p in (self.runs / ".submitit").glob("*/*_submitted.pkl"))

    def job_log(self, job_id: str) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted((self.runs / ".submitit" / job_id).glob("*_log.*")))

    def result(self) -> tuple[Path, dict]:
        [path] = self.runs.glob("*/result.json")
        return path.parent, json.loads(path.read_text())


def job(job_id: str, settled: bool = True) -> dict:
    """What scontrol says of one job (an array task: <array>_<task>); settled: once SLURM has finished it (the
    sweep command returns as soon as the job's result is written, a moment before)."""
    t0 = time.time()
    while True:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
        if not settled or fields.get("JobState") not in ("RUNNING", "COMPLETING") or time.time() - t0 > 120:
            return {k: fields.get(k) for k in JOB_FIELDS} | {"job_id": job_id}
        time.sleep(1)


def report_rows(folder: Path) -> list[dict]:
    """`qspeech report` in `folder`: the rows of its runs (results.csv, the paper's reference rows left out)."""
    subprocess.run([QSPEECH, "report"], cwd=folder, capture_output=True, check=True)
    with open(folder / "outputs" / "results.csv") as f:
        return [r for r in csv.DictReader(f) if r["source"] == "qspeech"]


def comparable(run_dir: Path) -> dict:
    """Every number and output of a finished run, without clocks, paths and cache hits."""
    res = json.loads((run_dir / "result.json").read_text())
    out = {k: v for k, v in res.items() if k not in VOLATILE}
    out["config"] = {k: v for k, v in out["config"].items() if k != "cache_dir"}
    out["metrics"] = {k: v for k, v in (out.get("metrics") or {}).items() if k not in VOLATILE_METRICS}
    out["files"] = {n: (run_dir / n).read_text() for n in ("test_predictions.tsv", "metrics.csv", "cost.json")}
    head = torch.load(run_dir / "downstream.pt", map_location="cpu", weights_only=True)
    out["head"] = {k: v.tolist() for k, v in head["model"].items()} | {"best_step": head["best_step"]}
    return out


def fingerprint(run_dir: Path) -> dict:
    """Numbers that move with every training step, to show in the JSON beside the comparison: the test score, the
    last logged train loss, and hashes of the head's weights and of the test predictions."""
    res = json.loads((run_dir / "result.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        losses = [float(r["value"]) for r in csv.DictReader(f) if r["split"] == "train"]
    head = torch.load(run_dir / "downstream.pt", map_location="cpu", weights_only=True)["model"]
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(head.items()))).hexdigest()[:16]
    return {res["metric"]: res["value"], "cer": res["metrics"].get("cer"), "last_train_loss": losses[-1],
            "head_sha256": digest,
            "predictions_sha256": hashlib.sha256((run_dir / "test_predictions.tsv").read_bytes()).hexdigest()[:16]}


class Checks:
    """Named checks of one scenario: `ok` is their conjunction."""

    def __init__(self):
        self.items: dict[str, bool] = {}

    def __call__(self, name: str, passed: bool) -> bool:
        self.items[name] = bool(passed)
        print(f"  {'ok  ' if passed else 'FAIL'} {name}", flush=True)
        return bool(passed)

    def summary(self) -> dict:
        return {"ok": all(self.items.values()), "checks": self.items}


def wait_for(predicate, timeout: float, what: str) -> None:
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------ scenarios
def sweep(work: Path) -> dict:
    print("sweep: experiment=smoke bits=2,4,8,32 through SLURM and locally", flush=True)
    check = Checks()
    cluster = Sweep(work / "sweep_slurm", ["-m", *SMOKE, "bits=2,4,8,32", *LAUNCHER, "hydra.launcher.timeout_min=20"])
    local = Sweep(work / "sweep_local", ["-m", *SMOKE, "bits=2,4,8,32"])
    commands = {"slurm": cluster.wait(), "local": local.wait()}
    jobs = [job(d.name) for d in cluster.job_dirs()]
    check("both sweeps exit 0", commands["slurm"]["rc"] == 0 and commands["local"]["rc"] == 0)
    check("four SLURM jobs, all COMPLETED, none restarted",
          len(jobs) == 4 and all(j["JobState"] == "COMPLETED" and j["Restarts"] == "0" for j in jobs))
    slurm_rows, local_rows = report_rows(cluster.folder), report_rows(local.folder)
    key = lambda r: int(r["bits"])  # noqa: E731
    check("the report holds four ok rows, bits 2, 4, 8, 32",
          sorted(map(key, slurm_rows)) == [2, 4, 8, 32] and all(r["status"] == "ok" for r in slurm_rows))
    check("the four rows equal the local sweep's", sorted(slurm_rows, key=key) == sorted(local_rows, key=key))
    return {"commands": commands, "jobs": jobs, "rows": sorted(slurm_rows, key=key)} | check.summary()


def baseline(work: Path) -> tuple[Path, dict]:
    """The long training, uninterrupted, on this machine (what the requeued jobs must reproduce)."""
    print("baseline: the long training, uninterrupted, locally", flush=True)
    local = Sweep(work / "long_local", LONG)
    info = local.wait()
    run_dir, res = local.result()
    assert info["rc"] == 0 and res["status"] == "ok", local.log.read_text()[-3000:]
    return run_dir, info | {"numbers": fingerprint(run_dir)}


def requeue(work: Path, base: Path) -> dict:
    print("requeue: the long training, `scontrol requeue` mid-way", flush=True)
    check = Checks()
    s = Sweep(work / "requeue", ["-m", *LONG, *LAUNCHER, "hydra.launcher.timeout_min=30"])
    wait_for(lambda: s.job_dirs(), 120, "the job's submission")
    job_id = s.job_dirs()[0].name
    wait_for(lambda: "asr asr_small: step 20/300" in s.job_log(job_id), 600, "step 20 of the job")
    t_requeue = time.time()
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_for(lambda: "stopped by SIGTERM at step" in s.job_log(job_id), 60, "the job's stop")
    first = s.job_log(job_id)
    stopped = int(first.split("stopped by SIGTERM at step ")[1].split("/")[0])
    wait_for(lambda: job(job_id, settled=False)["JobState"] in ("PENDING", "REQUEUED"), 60, "the requeue")
    info = s.wait()
    final, log = job(job_id), s.job_log(job_id)
    run_dir, res = s.result()
    check("the sweep command exits 0", info["rc"] == 0)
    check("the job stopped at a step boundary with one line", f"qspeech: stopped by SIGTERM at step {stopped}/300 of "
          f"asr asr_small (state saved in " in first and "Traceback" not in log)
    check("SLURM requeued it once and it COMPLETED", final["Restarts"] == "1" and final["JobState"] == "COMPLETED")
    check("the requeued job resumed from the step it stopped at", res["metrics"]["resumed_from_step"] == stopped)
    check("it ended with the numbers of an uninterrupted run", comparable(run_dir) == comparable(base))
    return {"command": info["command"], "job": final, "stopped_at_step": stopped,
            "requeued_after_s": round(t_requeue - s.t0, 1), "wall_s": info["wall_s"],
            "resumed_from_step": res["metrics"]["resumed_from_step"], "numbers": fingerprint(run_dir)} | check.summary()


def timeout(work: Path, base: Path) -> dict:
    """A training sized to outlast its first 2-minute slot whatever the machine's load: about 120 s of steps at the
    speed the baseline measured, run through SLURM and, at the same time, locally (its uninterrupted twin)."""
    train_s = json.loads((base / "result.json").read_text())["metrics"]["train_wall_s"]
    steps = max(400, math.ceil(300 / train_s * 120 / 100) * 100)
    args = [a for a in LONG if not a.startswith("train.max_steps=")] + [f"train.max_steps={steps}"]
    print(f"timeout: a {steps}-step training under a 2-minute limit, requeued at each limit", flush=True)
    check = Checks()
    local = Sweep(work / "timeout_local", args)
    s = Sweep(work / "timeout", ["-m", *args, *LAUNCHER, "hydra.launcher.timeout_min=2",
                                 "hydra.launcher.signal_delay_s=30", "hydra.launcher.max_num_timeout=10"])
    local_info, info = local.wait(timeout=2400), s.wait(timeout=2400)
    [d] = s.job_dirs()
    final, log = job(d.name), s.job_log(d.name)
    run_dir, res = s.result()
    stops = [int(x.split("/")[0]) for x in log.split("stopped by SIGUSR2 at step ")[1:]]
    check("the sweep command and the local run exit 0", info["rc"] == 0 and local_info["rc"] == 0)
    # A limit's signal that lands while the finished job's interpreter exits (its handlers gone) ends it with
    # 128 + SIGUSR2 after its result was written: SLURM says FAILED, the work is done. Recorded, not hidden.
    last = log.split("Starting with JobEnvironment")[-1]
    raced = final["ExitCode"] == "140:0" and "Job completed successfully" in last
    check("the job was requeued at its time limit and finished its work",
          int(final["Restarts"]) >= 1 and (final["JobState"] == "COMPLETED" or raced))
    check("a limit stopped the training at a step boundary (SIGUSR2) and the job resumed from it",
          len(stops) >= 1 and res["metrics"]["resumed_from_step"] in (stops[-1], steps) and "Traceback" not in log)
    check("it ended with the numbers of an uninterrupted run", comparable(run_dir) == comparable(local.result()[0]))
    return {"command": info["command"], "job": final, "stopped_at_steps": stops, "wall_s": info["wall_s"],
            "resumed_from_step": res["metrics"]["resumed_from_step"], "numbers": fingerprint(run_dir),
            "signal_after_completion": raced, "local": local_info | {"numbers": fingerprint(local.result()[0])}} | check.summary()


def failure(work: Path) -> dict:
    print("failure: bad overrides", flush=True)
    check = Checks()
    rejected = Sweep(work / "rejected", ["-m", *SMOKE, "bits=2,5", *LAUNCHER])
    rej = rejected.wait()
    text = rejected.log.read_text().strip()
    check("bits=5 is refused before any job is submitted: exit 2, one line",
          rej["rc"] == 2 and text.count("\n") == 0 and text.startswith("qspeech: error: bits=5")
          and not (rejected.runs / ".submitit").exists())
    missing = "/data/missing/tiny_hubert.pt"
    s = Sweep(work / "failure", ["-m", *SMOKE, "model.init=pretrained", f"model.ckpt={missing}", *LAUNCHER,
                                 "hydra.launcher.timeout_min=10"])
    info = s.wait()
    [d] = s.job_dirs()
    final, log = job(d.name), s.job_log(d.name)
    errors = [line for line in log.splitlines() if line.startswith("qspeech: error:")]
    _, res = s.result()
    rows = report_rows(s.folder)
    check("the job ran once (no requeue)", final["Restarts"] == "0" and final["JobState"] == "COMPLETED")
    check("one clear line in its log, no traceback", len(errors) == 1 and missing in errors[0] and "Traceback" not in log)
    check("result.json and the report say failed", res["status"] == "failed" and [r["status"] for r in rows] == ["failed"])
    return {"rejected": rej | {"output": text}, "command": info["command"], "job": final,
            "log_line": errors[0] if errors else None, "report_status": [r["status"] for r in rows]} | check.summary()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder of the scenarios' runs and caches")
    p.add_argument("--out", type=Path, required=True, help="the JSON written")
    p.add_argument("--cluster-up-s", type=float, default=None)
    p.add_argument("--only", nargs="*", default=None, help="scenarios to run (default: all)")
    args = p.parse_args(argv)
    out: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "slurm": _version(),
                 "node": subprocess.run(["sinfo", "-h", "-o", "%n %c CPUs %m MB"], capture_output=True,
                                        text=True).stdout.strip(),
                 "cluster_up_s": args.cluster_up_s, "qspeech": QSPEECH}
    t0 = time.time()
    base = None
    for name in args.only or ["sweep", "requeue", "timeout", "failure"]:
        t = time.time()
        try:
            if name in ("requeue", "timeout") and base is None:
                base, out["baseline"] = baseline(args.work)
            out[name] = {"sweep": sweep, "failure": failure}[name](args.work) if name in ("sweep", "failure") \
                else {"requeue": requeue, "timeout": timeout}[name](args.work, base)
        except Exception as e:  # noqa: BLE001 - one scenario's breakage is recorded, the others still run
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            print(f"  FAIL {name}: {type(e).__name__}: {e}", flush=True)
        out[name]["seconds"] = round(time.time() - t, 1)
        _write(args.out, out)
    out["seconds"] = round(time.time() - t0, 1)
    out["ok"] = all(out[n]["ok"] for n in args.only or ["sweep", "requeue", "timeout", "failure"])
    _write(args.out, out)
    print(f"slurm_check: {'ok' if out['ok'] else 'FAILED'} -> {args.out}")
    return 0 if out["ok"] else 1


def _version() -> str:
    return subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout.strip()


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
