"""`qspeech <command>`: subcommand dispatch. Hydra commands (run, cost, data, pretrain, distill) take
Hydra overrides; known errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import qspeech.pretrain.config  # noqa: F401 - registers the pretrain / distill schemas
from qspeech.checks import describe
from qspeech.config import CONF_DIR, GROUPS, RunConfig, group_options, to_typed
from qspeech.errors import ConfigError, QSpeechError

EXIT_USER_ERROR = 2
HELP = """usage: qspeech <command> [options | hydra overrides]

commands:
  run        quantize an upstream, train/evaluate the downstream task, write result.json
             (e.g. `qspeech run model=hubert bits=2 task=asr`, `qspeech run -m bits=1,2,4,8,32`)
  cost       storage / MACs / estimated runtime of a quantized upstream, no data or training (cost.json)
  report     collect outputs/**/result.json into outputs/results.csv, report.md and report.png
  export     write the quantized upstream as a bit-packed safetensors file and check it reloads exactly
  bench      measured forward latency: torch fp32, onnxruntime fp32, bf16, int8, 4/2/1-bit packed kernels
  data       build / check a dataset (the offline corpus is built on first use anyway)
  pretrain   HuBERT pretraining of tiny_hubert on the offline corpus
  distill    DistilHuBERT distillation of tiny_hubert into tiny_distilhubert
  assets     rebuild the packaged tiny checkpoints with their recorded settings
  demo       the paper's study in miniature on the offline default, then the report

Hydra commands accept `--help`, `--cfg job`, `-m/--multirun` and overrides such as `model=wavlm bits=4`.
Config groups: model, quant, task, data, train (see conf/); `bits` is one of 1, 2, 3, 4, 8, 16, 32.
"""


def fail(msg: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"qspeech: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _register_resolvers() -> None:
    from qspeech.runner import run_id

    def run_name(*, _root_: DictConfig) -> str:
        cfg = OmegaConf.masked_copy(_root_, [k for k in _root_.keys() if k not in ("hydra", "cache_dir")])
        quant = "fp" if int(cfg.bits) >= 32 else cfg.quant.method
        init = "" if cfg.model.init == "pretrained" else f"-{cfg.model.init}"
        task = cfg.task.name if "task" in cfg else "none"
        data = cfg.data.name if "data" in cfg else "none"
        return f"{cfg.model.name}{init}_{quant}_b{cfg.bits}_{task}_{data}_{run_id(cfg)}"

    if not OmegaConf.has_resolver("qspeech_run_name"):
        OmegaConf.register_new_resolver("qspeech_run_name", run_name)


# ---------------------------------------------------------------- Hydra's command line
def hydra_args(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """(overrides, flags, info_only): argv split by Hydra's own parser, so flags may come before, between or
    after the overrides. info_only: a flag that only prints (--help, --info, ...), no job runs."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_intermixed_args(argv)
    overrides, flags, i = list(args.overrides), [], 0
    for a in argv:
        if i < len(overrides) and a == overrides[i]:
            i += 1
        else:
            flags.append(a)
    return overrides, flags, bool(args.help or args.hydra_help or args.info or args.shell_completion)


def _sweep_variants(overrides: list[str]) -> list[list[str]]:
    """The override lists of a sweep: the first value of every swept key, then each other value of one key
    (every value of every key is composed once). Group options are checked against conf/ first."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]}") from None
    base: list[str] = []
    sweeps: list[tuple[str, list[str]]] = []
    for o in parsed:
        key = o.get_key_element()
        values = None
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # glob / range sweeps over groups: leave them to Hydra
                base.append(o.input_line)
            else:
                sweeps.append((key, values))
                base.append(f"{key}={values[0]}")
        else:
            base.append(o.input_line)
        group = key.lstrip("+~")
        if group in GROUPS and not o.is_delete() and (values is not None or not o.is_sweep_override()):
            for v in values if values is not None else [o.value()]:
                if v is not None and str(v) not in group_options(group):
                    raise ConfigError(f"{group}={v}: no such option; choose one of {', '.join(group_options(group))}")
    variants = [base]
    for key, values in sweeps:
        for v in values[1:]:
            variants.append([f"{key}={v}" if s.split("=", 1)[0] == key else s for s in base])
    return variants


def _compose_error(e: Exception, overrides: list[str]) -> str:
    from omegaconf.errors import OmegaConfBaseException

    cause = e if isinstance(e, OmegaConfBaseException) else e.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return describe(cause)
    msg = " ".join(str(e).split())
    shown = " ".join(o for o in overrides if not o.startswith("command="))
    return f"bad override ({shown}): {msg[:300]}"


def precheck(config_name: str, overrides: list[str]) -> None:
    """Compose the config for every value of every sweep parameter and type it (to_typed checks every
    value), so a bad value is one clear line (exit 2) before any job of a sweep starts."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    variants = _sweep_variants(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="qspeech"):
        for ov in variants:
            try:
                cfg = compose(config_name=config_name, overrides=ov)
            except (HydraException, OmegaConfBaseException) as e:
                raise ConfigError(_compose_error(e, ov)) from None
            to_typed(cfg)


# ---------------------------------------------------------------- Hydra commands
def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _job(fn: Callable[[object, Path], object], failures: list[BaseException]) -> Callable[[DictConfig], object]:
    """Hydra's task function: `fn` gets the typed config and the run folder. Known errors: one line, exit 2;
    in a sweep a failed job is added to `failures` and the others still run."""

    def task(cfg: DictConfig):
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            return fn(to_typed(cfg), run_dir)
        except QSpeechError as e:
            print(f"qspeech: error: {e}", file=sys.stderr)
            failures.append(e)
            if not _is_multirun():
                sys.exit(EXIT_USER_ERROR)
        except Exception as e:
            if not _is_multirun():
                raise
            traceback.print_exc()
            failures.append(e)
        return None

    return task


def launch(config_name: str, command: str, argv: list[str], fn: Callable[[object, Path], object]) -> None:
    import hydra

    _register_resolvers()
    try:
        overrides, flags, info_only = hydra_args(argv)
        if not info_only:
            overrides.append(f"command={command}")
            precheck(config_name, overrides)
    except QSpeechError as e:
        fail(str(e))
    failures: list[BaseException] = []
    main = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(_job(fn, failures))
    sys.argv = [f"qspeech {command}", *overrides, *flags]  # Hydra's parser: overrides first, then flags
    main()
    if failures:
        sys.exit(EXIT_USER_ERROR if all(isinstance(e, QSpeechError) for e in failures) else 1)


def _cmd_run(cfg: RunConfig, run_dir: Path) -> "RunResult":  # noqa: F821
    from qspeech.runner import run

    result = run(cfg, run_dir)
    metric = f"{result.metric}={result.value:.2f}" if result.value is not None else ""
    print(f"[qspeech] {cfg.model.name} {cfg.quant.method} {cfg.bits}-bit {cfg.task.name}: {metric} "
          f"storage {result.storage_mb:.2f} MB, est. runtime {result.est_runtime:.3f} -> {run_dir}/result.json")
    return result


def _cmd_cost(cfg: RunConfig, run_dir: Path) -> dict:
    from qspeech.cost import format_table
    from qspeech.results import COST_FILE
    from qspeech.runner import compute_cost, write_cost
    from qspeech.seeding import seed_everything
    from qspeech.upstream import build_upstream

    seed_everything(cfg.seed)
    # accounting needs the architecture only: no download
    model_cfg = cfg.model if cfg.model.ckpt else dataclasses.replace(cfg.model, init="random")
    report = compute_cost(cfg, build_upstream(model_cfg))
    print(format_table(report))
    out = write_cost(cfg, report, run_dir)
    print(f"-> {run_dir / COST_FILE}")
    return out


def _cmd_export(cfg: RunConfig, run_dir: Path):
    from qspeech.export import main as export_main

    return export_main(cfg, run_dir)


def _cmd_bench(cfg: RunConfig, run_dir: Path):
    from qspeech.bench import main as bench_main

    return bench_main(cfg, run_dir)


def _cmd_data(cfg: RunConfig, run_dir: Path) -> dict:
    import json

    from qspeech.data import prepare

    summary = prepare(cfg.data, cfg.cache_dir)
    print(json.dumps(summary, indent=2, default=str))
    return summary


def _cmd_pretrain(cfg, run_dir: Path):
    from qspeech.pretrain import hubert

    return hubert.main(cfg)


def _cmd_distill(cfg, run_dir: Path):
    from qspeech.pretrain import distilhubert

    return distilhubert.main(cfg)


# ---------------------------------------------------------------- plain commands
def _cmd_report(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="qspeech report", description="Collect result.json files into a table.")
    p.add_argument("--outputs", default="outputs", help="folder searched for result.json (default: outputs)")
    args = p.parse_args(argv)
    from qspeech.report import make_report

    out = make_report(args.outputs)
    for problem in out["problems"]:
        print(f"qspeech: warning: {problem}", file=sys.stderr)
    print(Path(out["markdown"]).read_text())
    print(f"{out['runs']} runs -> {out['csv']}, {out['markdown']}" + (f", {out['plot']}" if out["plot"] else ""))


def _cmd_assets(argv: list[str]) -> None:
    from qspeech.pretrain import build_assets

    build_assets(argv)


def _cmd_demo(argv: list[str]) -> None:
    from qspeech.demo import main as demo_main

    demo_main(argv)


# command -> (its primary config in conf/, the function that gets the typed config and the run folder)
HYDRA_COMMANDS = {
    "run": ("config", _cmd_run),
    "cost": ("config", _cmd_cost),
    "export": ("config", _cmd_export),
    "bench": ("config", _cmd_bench),
    "data": ("config", _cmd_data),
    "pretrain": ("pretrain", _cmd_pretrain),
    "distill": ("distill", _cmd_distill),
}
PLAIN_COMMANDS = {"report": _cmd_report, "assets": _cmd_assets, "demo": _cmd_demo}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.getLogger("s3prl").setLevel(logging.WARNING)
    # s3prl builds pos_conv with the old weight_norm API; the deprecation note is noise for users.
    warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return
    command, rest = argv[0], argv[1:]
    if command in HYDRA_COMMANDS:
        config_name, fn = HYDRA_COMMANDS[command]
        launch(config_name, command, rest, fn)
    elif command in PLAIN_COMMANDS:
        try:
            PLAIN_COMMANDS[command](rest)
        except QSpeechError as e:
            fail(str(e))
    else:
        fail(f"unknown command '{command}'; commands: {', '.join([*HYDRA_COMMANDS, *PLAIN_COMMANDS])} "
             f"(qspeech --help)")


if __name__ == "__main__":
    main()

