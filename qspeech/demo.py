"""`qspeech demo` / `make demo`: the paper's study in miniature on the offline default.

tiny_hubert at 32/8/2/1 bits with rtn and at 2/1 bits with BiT-style QAT, tiny_distilhubert and FBANK (log-mel
features, no upstream: what pretraining adds), all on the ASR task of the synthesized corpus, each also scored
on real human speech when ../shared/data/real-speech is present; then the report. `--all` adds rtn 4-bit and
tiny_hubert's random-initialised twin (two more heads: about 6 min on two cores).
`--search` adds two mixed-precision rows: `qspeech search` allots bits per module at the storage of uniform
2-bit (rtn, and bit's QAT), then those plans run like the other rows.
`--seeds 3` adds seeds 1 and 2 of the full-precision, 2-bit, 1-bit (and searched) rows (mean +- std).
Jobs run as separate `qspeech run` processes (two at a time, one thread each: on two cores that beats one job
with two threads), the longest first so that the two workers finish together. Rerunning reuses
everything: each experiment's folder, trained head, features, QAT cache."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from omegaconf import OmegaConf

from qspeech.config import CONF_DIR
from qspeech.data.config import resolve_path
from qspeech.errors import QSpeechError
from qspeech.report import make_report
from qspeech.upstream.checkpoints import ASSET_DIR

COMMON = ["experiment=demo"]
# The rows whose spread over seeds the study reports (`--seeds N`: seeds 1..N-1 are added to seed 0).
SEEDED = ("tiny_hubert full precision", "tiny_hubert rtn 2-bit", "tiny_hubert bit (QAT) 2-bit",
          "tiny_hubert bit (QAT) 1-bit", "tiny_hubert rtn searched (2-bit storage)",
          "tiny_hubert bit (QAT) searched (2-bit storage)")
# `qspeech search` plans (name -> overrides): the storage of uniform 2-bit, the demo's quantized modules; bit's
# QAT has 1 and 2 bits, and 32 lets the search keep a sensitive module at full precision.
SEARCHES = {"demo_rtn_b2": ["quant=rtn"], "demo_bit_b2": ["quant=bit", "search.bits=[1,2,32]"]}
STUDY: list[tuple[str, list[str]]] = [
    ("tiny_hubert full precision", ["bits=32"]),
    *[(f"tiny_hubert rtn {b}-bit", ["quant=rtn", f"bits={b}"]) for b in (8, 4, 2, 1)],
    *[(f"tiny_hubert bit (QAT) {b}-bit", ["quant=bit", f"bits={b}"]) for b in (2, 1)],
    ("tiny_hubert random init", ["model.init=random", "bits=32"]),
    ("tiny_distilhubert full precision", ["model=tiny_distilhubert", "bits=32"]),
    ("fbank (no upstream)", ["model=fbank", "bits=32"]),
]
# Rows only with `--all`: they keep `make demo` near 30 min on two cores (rtn 4-bit sits beside 8-bit, within
# a point of full precision; the random-init head reaches 100 % WER: FBANK shows what pretraining adds).
EXTRA = ("tiny_hubert rtn 4-bit", "tiny_hubert random init")
# `--search`: the rows that run the SEARCHES plans
SEARCHED: list[tuple[str, list[str]]] = [
    ("tiny_hubert rtn searched (2-bit storage)", ["+quant_plan=demo_rtn_b2"]),
    ("tiny_hubert bit (QAT) searched (2-bit storage)", ["+quant_plan=demo_bit_b2"]),
]


def real_speech_available() -> bool:
    """Whether conf/eval_data/real_speech's test set (../shared/data/real-speech, not shipped) is on disk."""
    test = OmegaConf.load(CONF_DIR / "data" / "real_speech.yaml").splits.test
    return all(resolve_path(t).is_file() for t in ([test] if isinstance(test, str) else test))


def jobs(seeds: int, real_speech: bool, search: bool = False, all_rows: bool = False) -> list[tuple[str, list[str]]]:
    """(label, overrides) of every run: the study (its EXTRA rows with all_rows; the SEARCHED rows with search),
    the extra seeds of the SEEDED rows, and every run also scored on real human speech when it is available
    (`eval_data=real_speech`, never trained on)."""
    rows = [r for r in STUDY if all_rows or r[0] not in EXTRA] + (list(SEARCHED) if search else [])
    out = rows + [(f"{label} seed {k}", [*ov, f"seed={k}"]) for label, ov in rows if label in SEEDED
                  for k in range(1, seeds)]
    return [(label, [*ov, "eval_data=real_speech"] if real_speech else ov) for label, ov in out]


def search_commands(outputs: Path) -> list[tuple[str, list[str]]]:
    """(plan name, `qspeech search` arguments) of each SEARCHES plan, on the demo's corpus and quantized modules
    (read from conf/experiment/demo.yaml, so that the sensitivity pass reads the demo's own training audio)."""
    demo = OmegaConf.load(CONF_DIR / "experiment" / "demo.yaml")
    data = [f"data.mini.{k}={v}" for k, v in demo.data.mini.items()]
    targets = f"quant.targets=[{','.join(demo.quant.targets)}]"
    return [(name, ["search", "budget_bits=2", *ov, targets, *data, f"hydra.run.dir={outputs / 'search' / name}"])
            for name, ov in SEARCHES.items()]


def _longest_first(job: tuple[str, list[str]]) -> tuple[bool, int]:
    """Sort key: the extra seeds reuse their upstream's features, so they go after the first seed of every
    row; then the QAT 2-bit row (it distils its upstream before the head), the other upstreams' rows in
    STUDY's order (the QAT 1-bit row among them, late: its first stage is the 2-bit row's student, loaded
    from the cache once that row has made it), FBANK (no upstream) last."""
    label, ov = job
    cost = 0 if "model=fbank" in ov else 2 if "quant=bit" in ov and "bits=1" not in ov else 1
    return " seed " in label, -cost


def _run_job(label: str, args: list[str], log_dir: Path, threads: int) -> tuple[str, int, float, Path]:
    """`qspeech <args>` (args[0] is the command) with `threads` torch threads, appended to log_dir/<label>.log
    (a rerun that finds the job done must not erase the log of the run that did it)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    exe = Path(sys.executable).parent / "qspeech"
    cmd = [str(exe) if exe.exists() else "qspeech", *args, "hydra/job_logging=none", "hydra/hydra_logging=none"]
    log = log_dir / (label.replace(" ", "_").replace("(", "").replace(")", "") + ".log")
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] " + " ".join(cmd[1:]) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    return label, rc, time.perf_counter() - t, log


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="qspeech demo", description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2, help="experiments run at once (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per experiment (default 1)")
    p.add_argument("--outputs", default="outputs", help="where runs and the report go (default outputs)")
    p.add_argument("--seeds", type=int, default=1,
                   help=f"seeds of the rows {', '.join(SEEDED)} (default 1; 3 gives the README's mean +- std)")
    p.add_argument("--all", action="store_true", dest="all_rows",
                   help=f"also the rows {', '.join(EXTRA)} (about 6 min more on two cores)")
    p.add_argument("--search", action="store_true",
                   help="also the mixed-precision rows: qspeech search at the storage of uniform 2-bit, rtn and QAT")
    args = p.parse_args(argv)
    if args.seeds < 1:
        raise QSpeechError(f"--seeds {args.seeds}: must be at least 1")

    missing = [a for a in ("tiny_hubert.pt", "tiny_distilhubert.ckpt") if not (ASSET_DIR / a).is_file()]
    if missing:
        raise QSpeechError(f"packaged checkpoints missing from {ASSET_DIR}: {', '.join(missing)}; "
                           f"rebuild them with `make assets`")
    log_dir = Path(args.outputs) / "demo-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    real = real_speech_available()
    outputs = Path(args.outputs).resolve()
    todo = sorted(jobs(args.seeds, real, args.search, args.all_rows), key=_longest_first)
    searches = search_commands(outputs) if args.search else []
    print("qspeech demo: " + (f"{len(searches)} mixed-precision searches, then " if searches else "")
          + f"{len(todo)} experiments, {args.jobs} at a time; logs in {log_dir}/" + ("" if real else "; ../shared/data/real-speech not found: no real-speech column"),
          flush=True)
    failed = []

    def run_all(batch: list[tuple[str, list[str]]]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(_run_job, label, a, log_dir, args.threads) for label, a in batch]
            for fut in as_completed(futures):
                label, rc, secs, log = fut.result()
                status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {log})"
                print(f"  [{time.perf_counter() - t0:6.0f} s] {label}: {status} in {secs:.0f} s", flush=True)
                if rc != 0:
                    failed.append(label)

    run_all([(f"search {name}", a) for name, a in searches])
    plans = f"hydra.searchpath=[file://{outputs / 'search'}]"  # where +quant_plan=<name> is found
    run_all([(label, ["run", *COMMON, *ov, *([plans] if any(o.startswith("+quant_plan=") for o in ov) else []),
                      f"train.num_threads={args.threads}"]) for label, ov in todo])
    out = make_report(args.outputs)
    print(Path(out["markdown"]).read_text())
    minutes = (time.perf_counter() - t0) / 60
    print(f"qspeech demo: done in {minutes:.1f} min; report: {out['markdown']} (table), {out['csv']}"
          + (f", {out['plot']} (plots)" if out["plot"] else ""))
    if failed:
        raise QSpeechError(f"{len(failed)} demo experiment(s) failed: {', '.join(failed)}; see {log_dir}/")
