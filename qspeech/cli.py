"""`qspeech <command>`: subcommand dispatch. Hydra commands (run, cost, data, pretrain, distill, ...) take
Hydra overrides and flags in any order (qspeech.hydra_setup); the config of every job of a sweep is composed
and typed before the first starts (qspeech.sweep_check); known errors become one line on stderr and exit
code 2; `-sc install=bash` completes commands and overrides (qspeech.completion)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qspeech import bench, cache_admin, cost_command, demo, distributed, export, report, runner
from qspeech import search  # also registers the search schema and the resolver naming its folder
from qspeech.completion import hide_schemas, split_line
from qspeech.config import CONF_DIR, to_typed
from qspeech.data import prepare
from qspeech.errors import QSpeechError
from qspeech.loggers import mark_sweep
from qspeech.preemption import Preempted, stop
from qspeech.hydra_setup import (completion_mode, flag_error, hydra_args, hydra_defaults, quiet, register_resolvers,
                                 store_settings)
from qspeech.pretrain import build_assets, distilhubert, hubert
from qspeech.sweep_check import precheck

EXIT_USER_ERROR = 2
# Packages qspeech imports only where used, and how to install them (s3prl: see the README's set-up).
INSTALL_HINTS = {
    "s3prl": "pip install --no-deps s3prl==0.4.18 (its metadata pulls torchaudio, which qspeech does not need)",
    "tensorboard": "pip install 'qspeech[tensorboard]'",
    "mlflow": "pip install 'qspeech[mlflow]'",
    "optuna": "pip install 'qspeech[sweep]'",
}
HELP = """usage: qspeech <command> [options | hydra overrides]

commands:
  run        quantize an upstream, train/evaluate the downstream task, write result.json
             (e.g. `qspeech run model=hubert bits=2 task=asr`, `qspeech run -m bits=1,2,4,8,32`)
  cost       storage / MACs / estimated runtime of a quantized upstream, no data or training (cost.json)
  report     collect outputs/**/result.json into outputs/results.csv, report.md and report.png
  export     write the quantized upstream as a bit-packed safetensors file and check it reloads exactly
  bench      measured forward latency: torch fp32, onnxruntime fp32, bf16, int8, 4/2/1-bit packed kernels
  search     bits per module under a storage or runtime budget (budget_mb=, budget_runtime=, budget_bits=)
             -> a plan that `qspeech run` takes (mixed precision)
  data       build / check a dataset (the offline corpus is built on first use anyway)
  pretrain   HuBERT pretraining of tiny_hubert on the offline corpus
  distill    DistilHuBERT distillation of tiny_hubert into tiny_distilhubert
  assets     rebuild the packaged tiny checkpoints with their recorded settings
  demo       the paper's study in miniature on the offline default, then the report
  cache      list | prune the shared cache (features, distilled students, head states, corpora) by size and age

Hydra commands accept `--help`, `--cfg job`, `-m/--multirun` and overrides such as `model=wavlm bits=4`,
in any order. Config groups: model, quant, task, data, train, eval_data, quant_audio, logger, experiment,
hparams_search (see
`qspeech run --help`); `bits` is one of 1, 2, 3, 4, 8, 16, 32.
Tab completion: eval "$(qspeech -sc install=bash)".
"""


def fail(msg: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"qspeech: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _missing_package(e: ModuleNotFoundError) -> QSpeechError | None:
    root = (e.name or "").split(".")[0]
    return QSpeechError(f"{root} is not installed: {INSTALL_HINTS[root]}") if root in INSTALL_HINTS else None


def _job(fn: Callable[[object, Path], object], failures: list[BaseException]) -> Callable[[DictConfig], object]:
    """Hydra's task function: `fn` gets the typed config and the run folder; what it returns goes back to
    Hydra (a sweeper's objective for `run`). Known errors: one line, exit 2; in a sweep a failed job is added
    to `failures`, returns None (a failed trial) and the others still run."""

    def task(cfg: DictConfig):
        quiet()
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        try:
            try:
                return fn(to_typed(cfg), run_dir)
            except ModuleNotFoundError as e:
                raise _missing_package(e) or e
            except Preempted as p:  # requeued by submitit, or exits; a job it gives up on fails here
                raise stop(p) from None
        except QSpeechError as e:
            print(f"qspeech: error: {e}", file=sys.stderr)
            failures.append(e)
            if not multirun:
                sys.exit(EXIT_USER_ERROR)
        except Exception as e:
            if not multirun:
                raise
            traceback.print_exc()
            failures.append(e)
        return None

    return task


def launch(config_name: str, command: str, argv: list[str], fn: Callable[[object, Path], object]) -> None:
    """Run a Hydra command: its overrides and flags split and pre-checked, then Hydra's app around `fn`."""
    register_resolvers()
    store_settings(command)
    try:
        overrides, flags, info_only = hydra_args(argv)
        overrides += hydra_defaults(overrides)
        if not info_only:
            overrides.append(f"command={command}")
            prints_only = any(f in ("-c", "--cfg") or f.startswith("--cfg=") for f in flags)  # --cfg writes nothing
            precheck(config_name, overrides, check_outputs=not prints_only)
    except QSpeechError as e:
        fail(str(e))
    if any(f in ("-m", "--multirun") for f in flags):  # the jobs' group in W&B (qspeech.loggers)
        mark_sweep(command)
    failures: list[BaseException] = []
    main = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(_job(fn, failures))
    # Hydra's parser: overrides first, then flags. argv[0] names the program in Hydra's completion script,
    # which must register `qspeech` (one command) and call `qspeech -sc query=...` (see _complete).
    program = "qspeech" if completion_mode(flags) else f"qspeech {command}"  # -sc is a flag, its mode an override
    sys.argv = [program, *overrides, *flags]
    main()
    if failures:
        sys.exit(EXIT_USER_ERROR if all(isinstance(e, QSpeechError) for e in failures) else 1)


def _data(cfg, run_dir: Path) -> dict:
    summary = prepare(cfg.data, cfg.cache_dir)
    print(json.dumps(summary, indent=2, default=str))
    return summary


def _cache(argv: list[str]) -> None:
    print(cache_admin.main(argv))


def _report(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="qspeech report", description="Collect result.json files into a table.")
    p.add_argument("--outputs", default="outputs", help="folder searched for result.json (default: outputs)")
    p.error = flag_error
    report.main(p.parse_args(argv).outputs)


# command -> (its primary config in conf/, the function that gets the typed config and the run folder)
HYDRA_COMMANDS = {
    "run": ("config", runner.main),
    "cost": ("config", cost_command.main),
    "export": ("config", export.main),
    "bench": ("config", bench.main),
    "data": ("config", _data),
    "pretrain": ("pretrain", lambda cfg, run_dir: hubert.main(cfg)),
    "distill": ("distill", lambda cfg, run_dir: distilhubert.main(cfg)),
    "search": ("search", search.main),
}
PLAIN_COMMANDS = {"report": _report, "assets": build_assets, "demo": demo.main, "cache": _cache}


def _complete(argv: list[str]) -> None:
    """`qspeech -sc install=bash | query=bash | ...`. Install/uninstall print Hydra's script for the program
    `qspeech`. A query (what that script runs on <TAB>, the line in COMP_LINE) completes the command word
    itself, or hands the rest of the line to the command's Hydra app (overrides, groups, options), whose
    answer loses the schema entries that only type the groups."""
    if not (completion_mode(argv) or "").startswith("query="):
        launch("config", "run", argv, runner.main)
        return
    command, line = split_line(os.environ.get("COMP_LINE", "qspeech "), [*HYDRA_COMMANDS, *PLAIN_COMMANDS])
    if command is None:
        print(line)  # the matching commands
    elif command in HYDRA_COMMANDS:
        os.environ["COMP_LINE"] = line
        config_name, fn = HYDRA_COMMANDS[command]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            launch(config_name, command, argv, fn)
        print(hide_schemas(out.getvalue()))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return
    command, rest = argv[0], argv[1:]
    try:
        if command in ("-sc", "--shell-completion") or command.startswith("--shell-completion="):
            _complete(argv)
        elif command in HYDRA_COMMANDS:
            if distributed.launched() and command != "run":  # the others would write one folder N times
                fail(f"under torchrun only `qspeech run` trains on several processes, not `qspeech {command}`")
            config_name, fn = HYDRA_COMMANDS[command]
            launch(config_name, command, rest, fn)
        elif command in PLAIN_COMMANDS:
            PLAIN_COMMANDS[command](rest)
        else:
            fail(f"unknown command '{command}'; commands: {', '.join([*HYDRA_COMMANDS, *PLAIN_COMMANDS])} "
                 f"(qspeech --help)")
    except QSpeechError as e:
        fail(str(e))
    except ModuleNotFoundError as e:
        if _missing_package(e) is None:
            raise
        fail(str(_missing_package(e)))


if __name__ == "__main__":
    main()
