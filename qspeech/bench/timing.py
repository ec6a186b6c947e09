"""Timing: median latencies of interleaved runs, and the speed-ups derived from them."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_ms(fn, repeats: int, warmup: int, sync=None) -> list[float]:
    """Wall times (ms) of `repeats` calls of fn after `warmup` calls; `sync` waits for the device."""
    for _ in range(max(0, warmup)):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(max(0, repeats)):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def time_interleaved(runners: dict, results: dict, repeats: int, warmup: int) -> None:
    """A warm-up of each runner (name -> (fn, sync)), then `repeats` rounds that run every one once
    (interleaved, so load changes on a shared machine hit all alike); fills results[name]'s times_ms, ms
    (median) and ms_min."""
    for fn, sync in runners.values():
        time_ms(fn, 0, warmup, sync)
    for _ in range(max(1, repeats)):
        for name, (fn, sync) in runners.items():
            results[name]["times_ms"].append(round(time_ms(fn, 1, 0, sync)[0], 2))
    for r in results.values():
        r["ms"] = statistics.median(r["times_ms"])
        r["ms_min"] = min(r["times_ms"])


def add_speedups(results: dict) -> dict:
    """Each variant's measured_speedup (torch_fp32's and ort_fp32's median latency over its own) and
    measured_speedup_min (the same from the fastest run of each, less sensitive to other jobs on a shared
    machine); returns name -> measured_speedup."""
    base, base_min = results["torch_fp32"]["ms"], results["torch_fp32"]["ms_min"]
    ort, ort_min = results.get("ort_fp32", {}).get("ms"), results.get("ort_fp32", {}).get("ms_min")
    speedups = {}
    for name, r in results.items():
        r["measured_speedup"] = {"vs_torch_fp32": round(base / r["ms"], 3),
                                 "vs_ort_fp32": round(ort / r["ms"], 3) if ort else None}
        r["measured_speedup_min"] = {"vs_torch_fp32": round(base_min / r["ms_min"], 3),
                                     "vs_ort_fp32": round(ort_min / r["ms_min"], 3) if ort_min else None}
        speedups[name] = r["measured_speedup"]
    return speedups
