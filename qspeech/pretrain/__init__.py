"""Pretraining the project's own upstreams: HuBERT masked prediction (`qspeech pretrain`), DistilHuBERT
distillation (`qspeech distill`) and rebuilding the packaged checkpoints (`qspeech assets`).

Entry points: qspeech.pretrain.hubert.main(cfg), qspeech.pretrain.distilhubert.main(cfg) (cfg = the typed
conf/pretrain.yaml / conf/distill.yaml: compose() below, or the CLI), and build_assets()."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from qspeech.config import CONF_DIR, to_typed
from qspeech.pretrain import config as _schemas  # noqa: F401 - registers the pretrain / distill schemas
from qspeech.pretrain import distilhubert, hubert


def compose(config_name: str, overrides: list[str] | None = None):
    """A primary config (pretrain / distill) composed from conf/ with Hydra's compose API, typed and checked
    (qspeech.pretrain.config)."""
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name=config_name):
        return to_typed(hydra_compose(config_name=config_name, overrides=list(overrides or [])))


def build_assets(argv: list[str] | None = None, *, run_root: str | Path | None = None,
                 pretrain_overrides: list[str] | None = None, distill_overrides: list[str] | None = None,
                 teacher: str | None = None) -> dict:
    """`qspeech assets`: rerun `qspeech pretrain` and then `qspeech distill` (teacher = the fresh tiny HuBERT)
    with the recorded settings (conf/pretrain.yaml, conf/distill.yaml) and install both checkpoints and
    their model cards into qspeech/assets/.

    argv (the CLI's): [--run-root DIR] [--pretrain OVERRIDE]... [--distill OVERRIDE]... [--teacher CKPT].
    The two run folders are <run-root>/pretrain and <run-root>/distill (default run root
    outputs/assets/<time>); giving the run root of an interrupted build resumes it. --teacher skips the
    pretraining and distills (and installs) from that tiny HuBERT checkpoint only."""
    ap = argparse.ArgumentParser(prog="qspeech assets", description=build_assets.__doc__.split("\n\n")[0])
    ap.add_argument("--run-root", default=None, help="folder for the two runs (resumes an interrupted build)")
    ap.add_argument("--pretrain", action="append", default=[], metavar="OVERRIDE", help="override for conf/pretrain.yaml")
    ap.add_argument("--distill", action="append", default=[], metavar="OVERRIDE", help="override for conf/distill.yaml")
    ap.add_argument("--teacher", default=None, help="distill only, from this tiny HuBERT checkpoint")
    args = ap.parse_args(list(argv or []))
    run_root = run_root or args.run_root
    teacher = teacher or args.teacher
    root = Path(run_root) if run_root else Path("outputs") / "assets" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out = {}
    if teacher is None:
        p_over = [f"run_dir={root / 'pretrain'}", "install=true", *args.pretrain, *(pretrain_overrides or [])]
        cmd = f"qspeech assets   # = qspeech pretrain {' '.join(p_over)}"
        out["pretrain"] = hubert.main(compose("pretrain", p_over + [f"command_line='{cmd}'"]))
        teacher = out["pretrain"]["checkpoint"]
    d_over = [f"run_dir={root / 'distill'}", "install=true", f"teacher.ckpt={teacher}", *args.distill,
              *(distill_overrides or [])]
    cmd = f"qspeech assets   # = qspeech distill {' '.join(d_over)}"
    out["distill"] = distilhubert.main(compose("distill", d_over + [f"command_line='{cmd}'"]))
    return out
