"""cost.json: the accounting of a run's upstream as its quant config will quantize it, written by every run
and by `qspeech cost` (the accounting alone: no data, no training, no download)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from qspeech.config import RunConfig
from qspeech.cost import CostReport, account_quantized, format_table
from qspeech.results import COST_FILE, write_json_atomic
from qspeech.seeding import seed_everything
from qspeech.upstream import build_upstream

log = logging.getLogger("qspeech")  # the commands' own lines

__all__ = ["compute_cost", "main", "write_cost"]


def compute_cost(cfg: RunConfig, upstream) -> CostReport:
    """Accounting of `upstream` as `cfg.quant` will quantize it (same module selection as the quantizer)."""
    return account_quantized(upstream, cfg.quant, int(cfg.bits), float(cfg.cost.seconds))


def write_cost(cfg: RunConfig, cost: CostReport, run_dir: Path) -> dict:
    """cost.json of a run folder: the accounting and what it describes."""
    out = cost.to_dict() | {"model": cfg.model.name, "quant": cfg.quant.method, "targets": list(cfg.quant.targets),
                            "bits": int(cfg.bits)}
    write_json_atomic(Path(run_dir) / COST_FILE, out)
    return out


def main(cfg: RunConfig, run_dir: Path) -> dict:
    """`qspeech cost`: print the accounting table and write <run_dir>/cost.json."""
    seed_everything(cfg.seed)
    # accounting needs the architecture only: no download
    model_cfg = cfg.model if cfg.model.ckpt else dataclasses.replace(cfg.model, init="random")
    report = compute_cost(cfg, build_upstream(model_cfg))
    print(format_table(report))
    out = write_cost(cfg, report, run_dir)
    log.info(f"-> {run_dir / COST_FILE}")
    return out
