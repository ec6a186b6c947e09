"""Downstream training speed with the upstream feature cache vs recomputing the upstream every step.

Same data, same steps, one process: trains task=asr_small twice through qspeech.tasks.run_task, once with
train.cache_features=true (the cache is built first; its build time is reported separately) and once with
train.cache_features=false (the frozen upstream runs inside every training step). Prints training
throughput of both and their ratio.

    python benchmarks/bench_feature_cache.py [--utts 200] [--steps 40] [--threads 1] [--model tiny_hubert]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--utts", type=int, default=200, help="training utterances (mini corpus)")
    ap.add_argument("--eval-utts", type=int, default=10, help="dev/test utterances (kept small)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="tiny_hubert", help="conf/model/<name>.yaml")
    ap.add_argument("--cache-dir", default=os.environ.get("QSPEECH_CACHE", str(Path.home() / ".cache/qspeech")),
                    help="where the mini corpus is (or gets built); the benchmark's feature caches are removed after")
    ap.add_argument("--no-unlabeled", action="store_true", help="data.mini.n_unlabeled=0 (a smaller corpus build)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from qspeech.tasks import run_task
    from qspeech.upstream import build_upstream, fingerprint

    torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir)
    work = Path(tempfile.mkdtemp(prefix="qspeech-bench-"))
    feat_root = cache / "features"
    before = set(feat_root.iterdir()) if feat_root.exists() else set()

    def run_config(cache_features: bool):
        """The typed run config (conf/config.yaml composed with Hydra, as `qspeech run` does)."""
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        from qspeech.config import CONF_DIR, to_typed

        GlobalHydra.instance().clear()
        overrides = [f"model={args.model}", "task=asr_small", "train=cpu", "data=mini", f"cache_dir={cache}",
                     f"data.max_utts.train={args.utts}", f"data.max_utts.dev={args.eval_utts}",
                     f"data.max_utts.test={args.eval_utts}", "data.max_utts.unlabeled=0",
                     f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
                     f"train.batch_size={args.batch_size}", f"train.cache_features={str(cache_features).lower()}",
                     f"train.num_threads={args.threads}", "train.resume=false",
                     f"train.ckpt_dir={work / f'ckpt-{cache_features}'}"]
        if args.no_unlabeled:
            overrides.append("data.mini.n_unlabeled=0")
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return to_typed(compose(config_name="config", overrides=overrides))

    torch.manual_seed(0)
    model_cfg = run_config(True).model
    try:
        upstream = build_upstream(model_cfg)
    except Exception as e:  # noqa: BLE001 - e.g. no network for a pretrained checkpoint: speed is the same
        print(f"(pretrained {args.model} unavailable: {str(e)[:120]}...; using random init)")
        upstream = build_upstream(dataclasses.replace(model_cfg, init="random"))

    results = {}
    for mode in (True, False):
        cfg = run_config(mode)
        # corpus preparation is not part of either timing
        from qspeech.data import load_split

        for s in ("train", "dev", "test"):
            load_split(cfg.data, s, cache)
        t0 = time.perf_counter()
        key = fingerprint(upstream, extra=f"bench-{time.time()}")  # fresh key: the cache is built here
        m = dataclasses.asdict(run_task(cfg, upstream, work / f"run-{mode}", key, progress=False))
        m["total_s"] = time.perf_counter() - t0
        results["cache" if mode else "no cache"] = m
        print(f"{'cache' if mode else 'no cache':>9}: feature_cache={m['feature_cache']:<4} "
              f"train {m['train_utts_per_s']:.1f} utts/s ({m['steps']} steps, train_wall {m['train_wall_s']:.1f} s), "
              f"upstream {m['upstream_utts_per_s']:.1f} utts/s, whole run {m['total_s']:.1f} s")

    for d in (set(feat_root.iterdir()) if feat_root.exists() else set()) - before:
        shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)

    on, off = results["cache"], results["no cache"]
    ratio = on["train_utts_per_s"] / off["train_utts_per_s"]
    n = on["n_train"] + on["n_dev"] + on["n_test"]
    build_s = n / on["upstream_utts_per_s"]
    print(f"\nspeed-up of downstream training steps with the feature cache: {ratio:.2f}x "
          f"({on['train_utts_per_s']:.1f} vs {off['train_utts_per_s']:.1f} utts/s; upstream={args.model}, "
          f"{args.threads} thread(s), batch {args.batch_size})")
    per_epoch_saved = on["n_train"] / off["train_utts_per_s"] - on["n_train"] / on["train_utts_per_s"]
    if per_epoch_saved > 0:
        print(f"one-off cache build ~{build_s:.1f} s (upstream pass) pays for itself after "
              f"{build_s / per_epoch_saved:.2f} epochs of training")


if __name__ == "__main__":
    main()
