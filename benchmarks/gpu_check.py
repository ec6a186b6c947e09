"""A prepared GPU check: the CUDA training path and the CUDA speed variants of HuBERT Base, in one JSON.

On a machine whose pip reaches PyPI (the project installed with `make install`):

    make gpu-check                                   # writes outputs/gpu_check.json; <= 5 min on one H200

On a GPU machine without network whose Python already has torch (e.g. the device tool's image): fetch the
wheels that image lacks here first, carry .whl/ there, then

    make gpu-wheels                                  # here: Python 3.12 manylinux wheels into .whl/
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json"

What it does:
1. train: `qspeech run model=hubert model.init=random task=asr data=mini train=superb` for --steps steps on
   CUDA (bf16 autocast, train.amp=auto), the upstream in the loop every step (no feature cache), on a small
   synthesized corpus: wall time, steps per second and the run's result.json. Its WER after a few hundred steps
   from random weights means nothing; the check is that the path runs and how fast.
2. bench: HuBERT Base (random weights) forward on --batch x --seconds of audio: torch fp32, TF32, fp16, bf16
   (autocast and a bf16 model), and torchao's int8 / int4 weight-only kernels where torchao imports; median ms
   over --repeats after --warmup, speedup against fp32, max abs error of the last hidden state against fp32.
3. qat: --qat-steps steps of BiT-style 2-bit distillation of the upstream on the device under bf16 autocast
   (qspeech.quantize_upstream with the run's placement): seconds per step, the losses, where the tensors were.
4. lstm: the ASR head's BiLSTM (1024 x 2 directions) on the device: cuDNN's fused bidirectional kernel against
   the two-pass path, same parameters: max difference, milliseconds each, the output dtype under bf16 autocast.
5. ddp: with more than one GPU, the smoke recipe through `torchrun --nproc_per_node=2` (skipped otherwise).
The training check's DataLoader has 2 workers (train.num_workers=2), pinned memory on CUDA.
`--device cpu --model tiny_hubert` runs the same code on the CPU (the tests do, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "cuda": torch.version.cuda, "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gb=round(p.total_memory / 2**30, 1))
    try:
        import torchao

        env["torchao"] = torchao.__version__
    except Exception as e:  # noqa: BLE001 - absent or broken: the int8/int4 rows say so
        env["torchao"] = f"not importable ({type(e).__name__})"
    return env


# ------------------------------------------------------------------------------------------------ training
def train_check(args, device: torch.device, work: Path) -> dict:
    """The real CLI in a child process (so its Hydra state and threads are its own)."""
    run_dir = work / "train_run"
    cmd = [sys.executable, "-m", "qspeech", "run", f"model={args.model}", "model.init=random", f"task={args.task}",
           "data=mini", "train=superb", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
           f"train.log_every={max(1, args.steps // 10)}", "train.cache_features=false",
           f"train.device={device.type}", f"data.mini.n_train={args.n_train}", f"data.mini.n_dev={args.n_eval}",
           f"data.mini.n_test={args.n_eval}", "train.num_workers=2", "export=false", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "QSPEECH_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = {"command": " ".join(["qspeech", *cmd[3:]]), "returncode": proc.returncode, "wall_s": round(wall, 1)}
    result = run_dir / "result.json"
    if proc.returncode != 0 or not result.exists():
        out["error"] = (proc.stderr or proc.stdout)[-3000:]
        return out
    res = json.loads(result.read_text())
    timings = res.get("timings", {})
    out["result"] = {k: res.get(k) for k in ("status", "metrics", "timings", "storage_mb", "est_runtime")}
    m = res.get("metrics") or {}
    if m.get("train_wall_s"):
        out["steps_per_s"] = round(int(m.get("steps", 0)) / float(m["train_wall_s"]), 3)
    out["task_s"] = round(float(timings.get("task_s", 0.0)), 1)
    return out


# ------------------------------------------------------------------------------------------------ bench
def _time(fn, sync, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def _last(out) -> torch.Tensor:
    return out.hidden_states[-1].detach().float().cpu()


def _upstream(args):
    import dataclasses

    from omegaconf import OmegaConf

    from qspeech.checks import typed
    from qspeech.upstream import build_upstream
    from qspeech.upstream.config import ModelConfig

    """conf/model/<args.model>.yaml with random weights (speed does not depend on them)."""
    mcfg = typed(ModelConfig, OmegaConf.load(ROOT / "conf" / "model" / f"{args.model}.yaml"), "model")
    return build_upstream(dataclasses.replace(mcfg, init="random"))


def bench_check(args, device: torch.device) -> dict:
    torch.manual_seed(0)
    up = _upstream(args).eval().to(device)
    wavs = (torch.randn(args.batch, int(args.seconds * 16000), generator=torch.Generator().manual_seed(0)) * 0.1
            ).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows: dict[str, dict] = {}
    with torch.inference_mode():
        ref = _last(up(wavs))

        def add(name: str, fn, kernel: str) -> None:
            try:
                err = float((_last(fn()) - ref).abs().max())
                times = _time(fn, sync, args.warmup, args.repeats)
                rows[name] = {"kernel": kernel, "ms": round(statistics.median(times), 3),
                              "ms_min": round(min(times), 3), "max_abs_err": err}
            except Exception as e:  # noqa: BLE001 - one variant failing must not hide the others
                rows[name] = {"kernel": kernel, "error": f"{type(e).__name__}: {str(e)[:300]}"}

        add("fp32", lambda: up(wavs), "torch fp32")
        if device.type == "cuda":
            def tf32():
                torch.backends.cuda.matmul.allow_tf32 = True
                try:
                    return up(wavs)
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = False
            add("tf32", tf32, "torch fp32 with TF32 matmuls")
        add("bf16_autocast", lambda: _autocast(up, wavs, device, torch.bfloat16), "torch.autocast bfloat16")
        if device.type == "cuda":
            add("fp16_autocast", lambda: _autocast(up, wavs, device, torch.float16), "torch.autocast float16")
        for dtype, name in ((torch.bfloat16, "bf16_model"), (torch.float16, "fp16_model")):
            if device.type != "cuda" and dtype == torch.float16:
                continue
            m, w = copy.deepcopy(up).to(dtype), wavs.to(dtype)
            add(name, (lambda m_, w_: (lambda: m_(w_)))(m, w), f"model and input in {dtype}")
            del m
        for name, kernel in _torchao_variants(up, device):
            add(name, (lambda m_: (lambda: m_(wavs.to(next(m_.parameters()).dtype))))(kernel), name)
    base = rows["fp32"].get("ms")
    for r in rows.values():
        if base and r.get("ms"):
            r["speedup_vs_fp32"] = round(base / r["ms"], 3)
    return {"model": args.model, "batch": args.batch, "seconds": args.seconds, "repeats": args.repeats,
            "warmup": args.warmup, "variants": rows}


def _autocast(up, wavs, device, dtype):
    with torch.autocast(device.type, dtype=dtype):
        return up(wavs)


def _torchao_variants(up, device: torch.device):
    """torchao's weight-only int8 and int4 kernels on the transformer's Linear layers (CUDA only; int4 wants a
    bf16 model). Yields (name, model); a missing torchao or an unsupported config becomes an error row."""
    if device.type != "cuda":
        return
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001
        yield "torchao_unavailable", _Raise(f"torchao not importable: {type(e).__name__}: {e}")
        return
    for name, make, dtype in (("torchao_int8_weight_only", lambda: Int8WeightOnlyConfig(), torch.bfloat16),
                              ("torchao_int4_weight_only", lambda: Int4WeightOnlyConfig(group_size=128),
                               torch.bfloat16)):
        try:
            m = copy.deepcopy(up).to(dtype)
            quantize_(m, make())
            yield name, m
        except Exception as e:  # noqa: BLE001
            yield name, _Raise(f"{type(e).__name__}: {str(e)[:300]}")


class _Raise(torch.nn.Module):
    """A variant that could not be built: calling it raises, so its row records the reason."""

    def __init__(self, why: str):
        super().__init__()
        self.why = why
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, *_):
        raise RuntimeError(self.why)


# What the device tool's GPU image (Python 3.12, torch, numpy, pandas, onnx...) lacks; versions as in the CPU venv.
GPU_WHEELS = ["hydra-core==1.3.2", "omegaconf==2.3.0", "jiwer==4.0.0", "rapidfuzz", "soxr", "soundfile", "cffi",
              "pycparser", "espeakng-loader==0.2.4", "wordfreq==3.1.1", "ftfy", "wcwidth", "langcodes", "locate",
              "torchao"]
SDIST_ONLY = ["antlr4-python3-runtime==4.9.3", "s3prl==0.4.18"]  # pure Python: built into wheels here


def prepare_wheels(folder: Path, python: str = "3.12") -> list[Path]:
    """Download the wheels above for a manylinux x86-64 CPython `python` (and build the two sdists), then
    slim wordfreq's 57 MB wheel to its English lists (the mini corpus reads only those), so that the folder
    fits a 64 MiB transfer."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    plat = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                        "manylinux2014_x86_64") for a in ("--platform", p)]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python,
                    "--implementation", "cp", *plat, "-d", str(folder), *GPU_WHEELS], check=True)
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(folder), *SDIST_ONLY], check=True)
    for whl in folder.glob("wordfreq-*.whl"):
        slim = whl.with_suffix(".slim")
        _keep_only(whl, slim, lambda n: not n.startswith("wordfreq/data/") or n.endswith("_en.msgpack.gz"))
        shutil.move(slim, whl)
    wheels = sorted(folder.glob("*.whl"))
    print(f"[gpu_check] {len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / 2**20:.1f} MiB in {folder}")
    return wheels


def _keep_only(src: Path, dst: Path, keep) -> None:
    """Rewrite a wheel without the files `keep` rejects, and its RECORD without their lines (pip checks it)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if not keep(info.filename):
                continue
            data = zin.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(True)
                               if keep(line.split(",", 1)[0])).encode()
            zout.writestr(info, data)


# ------------------------------------------------------------------------------------------------ qat, lstm, ddp
def qat_check(args, device: torch.device, work: Path) -> dict:
    """A few distillation steps on the device under bf16 autocast: seconds per step, finite losses."""
    import numpy as np
    import soundfile as sf

    from qspeech.quant import quant_config
    from qspeech.quantize_upstream import Placement, prepare_quantized_upstream

    rng = np.random.default_rng(0)
    audio = []
    for i in range(8):
        audio.append(str(work / f"qat_{i}.wav"))
        sf.write(audio[-1], (0.1 * rng.standard_normal(16000 * 6)).astype("float32"), 16000)
    up = _upstream(args)
    cfg = quant_config("bit", steps=args.qat_steps, batch_size=4, max_seconds=4.0, targets=["linear", "cnn"])
    place = Placement(device, lambda: torch.autocast(device.type, dtype=torch.bfloat16))
    t0 = time.perf_counter()
    prepare_quantized_upstream(up, cfg, 2, audio, None, work / "qat_run", progress=False, placement=place)
    wall = time.perf_counter() - t0
    info = json.loads((work / "qat_run" / "quant_distill.json").read_text())
    stage = info["stages"][0]
    return {"steps": args.qat_steps, "wall_s": round(wall, 1), "s_per_step": round(stage["seconds"] / args.qat_steps, 3),
            "loss_first": stage["loss_first"], "loss_last": stage["loss_last"], "batch": "4 x 4 s"}


def lstm_check(args, device: torch.device) -> dict:
    """SUPERB's BiLSTM layer (1024 in, 1024 per direction) fused vs two-pass on `device`."""
    from qspeech.tasks.rnn import BiLSTM

    torch.manual_seed(0)
    d = 1024 if device.type == "cuda" else 64  # the CPU dry run checks the path, not the speed
    two, fused = BiLSTM(d, d, fused=False).to(device), BiLSTM(d, d, fused=True).to(device)
    fused.load_state_dict(two.state_dict())
    x = torch.randn(8, 600, d, device=device)
    lens = torch.tensor([600, 580, 550, 500, 450, 400, 350, 300], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    with torch.no_grad():
        diff = (two(x, lens) - fused(x, lens)).abs().max().item()
        for name, m in (("two_pass", two), ("fused", fused)):
            out[f"{name}_ms"] = round(statistics.median(_time(lambda: m(x, lens), sync, 1, max(3, args.repeats // 4))), 2)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            dtype = str(fused(x, lens).dtype)
    return {**out, "max_abs_diff": diff, "fused_dtype_under_bf16_autocast": dtype, "shape": f"8 x 600 x {d}"}


def ddp_check(args, work: Path) -> dict:
    """The smoke recipe on 2 GPUs through torchrun (a process per GPU, NCCL)."""
    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s) visible; DDP needs 2"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "qspeech", "run",
           "experiment=smoke", "train.max_steps=20", "train.eval_every=10", f"hydra.run.dir={work / 'ddp_run'}"]
    env = {**os.environ, "QSPEECH_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    out = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        out["error"] = (proc.stderr or proc.stdout)[-2000:]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="outputs/gpu_check.json")
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of the script)")
    ap.add_argument("--model", default="hubert", help="model= config: hubert (Base) or tiny_hubert for a dry run")
    ap.add_argument("--task", default="asr", help="task= config of the training check (asr: SUPERB's head)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n-train", type=int, default=500)
    ap.add_argument("--n-eval", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--qat-steps", type=int, default=10)
    ap.add_argument("--skip", choices=("train", "bench", "qat", "lstm", "ddp"), action="append", default=[])
    ap.add_argument("--prepare-wheels", metavar="DIR", help="only download the GPU image's missing wheels into DIR")
    args = ap.parse_args(argv)
    if args.prepare_wheels:
        prepare_wheels(Path(args.prepare_wheels))
        return {}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU "
              "machine, or pass --device cpu --model tiny_hubert for a dry run", file=sys.stderr)
        raise SystemExit(2)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    report: dict = {"env": environment(device)}
    with tempfile.TemporaryDirectory(prefix="qspeech_gpu_check_") as work:
        if "train" not in args.skip:
            print("[gpu_check] training path ...", flush=True)
            report["train"] = train_check(args, device, Path(work))
        if "bench" not in args.skip:
            print("[gpu_check] speed variants ...", flush=True)
            report["bench"] = bench_check(args, device)
        for name, check in (("qat", lambda: qat_check(args, device, Path(work))), ("lstm", lambda: lstm_check(args, device)),
                            ("ddp", lambda: ddp_check(args, Path(work)))):
            if name not in args.skip:
                print(f"[gpu_check] {name} ...", flush=True)
                try:
                    report[name] = check()
                except Exception as e:  # noqa: BLE001 - one failed check must not lose the others' numbers
                    report[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    from qspeech.atomic import write_json_atomic

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)
    print(json.dumps({k: report[k] for k in ("env", "wall_s")}, indent=1))
    for name, r in report.get("bench", {}).get("variants", {}).items():
        print(f"  {name:28s} {r.get('ms', '-'):>10} ms  x{r.get('speedup_vs_fp32', '-')}  "
              f"err {r.get('max_abs_err', r.get('error', '-'))}")
    for name in ("qat", "lstm", "ddp"):
        if name in report:
            print(f"  {name}: {report[name]}")
    if "train" in report:
        t = report["train"]
        print(f"  train: rc={t['returncode']} wall {t['wall_s']} s" + (f" error: {t['error'][-300:]}" if "error" in t else ""))
    print(f"[gpu_check] wrote {out}")
    return report


if __name__ == "__main__":
    main()
