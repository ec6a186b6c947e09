"""`qspeech <command>`: subcommand dispatch. Hydra commands (run, cost, data, pretrain, distill) take
Hydra overrides and flags in any order; known errors become one line on stderr and exit code 2. The config of
every job of a sweep is composed and typed before the first starts; `qspeech run` returns the sweep objective
(optimized_metric) to Hydra's sweepers; `-sc install=bash` completes commands and overrides."""

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
import qspeech.search.config  # noqa: F401 - registers the search schema and its folder name
from qspeech import distributed
from qspeech.checks import describe
from qspeech.config import CONF_DIR, GROUPS, RunConfig, group_options, to_typed
from qspeech.errors import ConfigError, QSpeechError

log = logging.getLogger("qspeech")
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

Hydra commands accept `--help`, `--cfg job`, `-m/--multirun` and overrides such as `model=wavlm bits=4`,
in any order. Config groups: model, quant, task, data, train, logger, experiment, hparams_search (see
`qspeech run --help`); `bits` is one of 1, 2, 3, 4, 8, 16, 32.
Tab completion: eval "$(qspeech -sc install=bash)".
"""


def fail(msg: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"qspeech: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _register_resolvers() -> None:
    from qspeech.identity import run_name

    def resolve_run_name(*, _root_: DictConfig) -> str:
        return run_name(to_typed(_root_))

    if not OmegaConf.has_resolver("qspeech_run_name"):
        OmegaConf.register_new_resolver("qspeech_run_name", resolve_run_name)


# ---------------------------------------------------------------- Hydra's command line
def _flag_error(message: str):
    raise ConfigError(f"{message} (see --help)")


def hydra_args(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """(overrides, flags, info_only): argv split by Hydra's own parser, so flags may come before, between or
    after the overrides. info_only: a flag that only prints (--help, --info, ...), no job runs."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.error = _flag_error  # argparse would print its whole usage: one line, like every other error
    args = parser.parse_intermixed_args(argv)
    overrides, flags, i = list(args.overrides), [], 0
    for a in argv:
        if i < len(overrides) and a == overrides[i]:
            i += 1
        else:
            flags.append(a)
    return overrides, flags, bool(args.help or args.hydra_help or args.info or args.shell_completion)


def _sweep_values(o) -> list[str] | None:
    """The values of a sweep override that the pre-check composes: every value of a choice or a range, both
    ends of an interval (what lies between obeys the same range checks), the matching options of a glob over
    a config group; None: nothing to expand (a glob over anything else)."""
    from hydra.core.override_parser.types import Glob, IntervalSweep

    value = o.value()
    if isinstance(value, IntervalSweep):  # a sweeper's search space (Optuna, Nevergrad, ...)
        return [repr(value.start), repr(value.end)]
    if isinstance(value, Glob):
        group = o.get_key_element().lstrip("+~")
        return value.filter(group_options(group)) if group in GROUPS else None
    return list(o.sweep_string_iterator())


def _sweep_variants(overrides: list[str], params: dict | None = None) -> list[list[str]]:
    """The override lists of a sweep: the first value of every swept key, then each other value of one key
    (every value of every key is composed once). `params`: a sweeper's search space from the config
    (hydra.sweeper.params), for keys the command line does not set. Group options are checked against
    conf/ first."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    lines = list(overrides)
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    lines += [f"{k}={v}" for k, v in (params or {}).items() if k not in given]
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except HydraException as e:
        raise ConfigError(f"cannot parse overrides {lines}: {str(e).splitlines()[0]}") from None
    base: list[str] = []
    sweeps: list[tuple[str, list[str]]] = []
    for o in parsed:
        key = o.get_key_element()
        values = _sweep_values(o) if o.is_sweep_override() else None
        if values:
            sweeps.append((key, values))
            base.append(f"{key}={values[0]}")
        elif not o.is_sweep_override():
            base.append(o.input_line)
        group = key.lstrip("+~")
        if group in GROUPS and not o.is_delete():
            for v in values if values is not None else ([] if o.is_sweep_override() else [o.value()]):
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
    for plugin, package in (("hydra/sweeper/optuna", "hydra-optuna-sweeper"),
                            ("hydra/launcher/joblib", "hydra-joblib-launcher"),
                            ("hydra/launcher/submitit", "hydra-submitit-launcher")):
        if f"'{plugin}" in msg:
            return f"{plugin.split('/')[1]} '{plugin.split('/')[2]}' is not installed: pip install {package}"
    shown = " ".join(o for o in overrides if not o.startswith("command="))
    return f"bad override ({shown}): {msg[:300]}"


def precheck(config_name: str, overrides: list[str], check_outputs: bool = True) -> None:
    """Compose the config for every value of every sweep parameter (the command line's and the config's
    hydra.sweeper.params) and type it (to_typed checks every value), so a bad value is one clear line
    (exit 2) before any job of a sweep starts. Hydra's own settings are composed as they are."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    def typed(ov: list[str]):
        try:
            cfg = compose(config_name=config_name, overrides=ov, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(_compose_error(e, ov)) from None
        typed_cfg = to_typed(cfg)
        if check_outputs:  # Hydra opens its log file in the run folder before any qspeech code runs
            from qspeech.runner import check_output_folders

            check_output_folders(cfg)
        if isinstance(typed_cfg, RunConfig) and "command=run" in ov:
            from qspeech.loggers import check_available

            check_available(typed_cfg.logger)
        return cfg

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="qspeech"):
        first, *others = _sweep_variants(overrides)
        params = typed(first).hydra.sweeper.get("params")
        params = OmegaConf.to_container(params) if params else {}
        variants = _sweep_variants(overrides, params) if params else [first, *others]
        for ov in variants if params else others:
            typed(ov)


# ---------------------------------------------------------------- Hydra's settings for qspeech
def _hydra_settings(command: str) -> None:
    """Hydra config nodes of qspeech's own (ConfigStore): the help page (headed qspeech, the config groups
    without the schema entries that only type them) and job logging (plain console lines; every message,
    progress and results included, also in <run>/qspeech.log; s3prl's INFO dumps silenced in every job,
    launcher workers included)."""
    from hydra.core.config_store import ConfigStore

    groups = "\n".join(f"  {g}: {', '.join(group_options(g))}" for g in GROUPS if group_options(g))
    help_node = {
        "app_name": "qspeech",
        "header": f"qspeech {command} [overrides] [flags]",
        "footer": f"Hydra flags (--cfg job, -m, -sc install=bash, ...): qspeech {command} --hydra-help; "
                  "all commands: qspeech --help",
        "template": f"${{hydra.help.header}}\n\n== Config groups (group=option) ==\n{groups}\n\n"
                    "== Config == (override any key: foo.bar=value)\n\n$CONFIG\n${hydra.help.footer}\n",
    }
    logging_node = {
        "version": 1,
        "formatters": {"plain": {"format": "%(message)s"},
                       "file": {"format": "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stdout"},
                     "file": {"class": "logging.FileHandler", "formatter": "file",
                              "filename": "${hydra.runtime.output_dir}/${hydra.job.name}.log"}},
        "root": {"level": "INFO", "handlers": ["console", "file"]},
        "loggers": {"s3prl": {"level": "WARNING"}},
        "disable_existing_loggers": False,
    }
    ConfigStore.instance().store(group="hydra/help", name="qspeech", node=help_node, provider="qspeech")
    ConfigStore.instance().store(group="hydra/job_logging", name="qspeech", node=logging_node, provider="qspeech")
    # torchrun's ranks other than 0 (qspeech.distributed): warnings and errors on the console, no log file
    rank_node = {**logging_node, "formatters": {"plain": {"format": f"[rank {distributed.rank()}] %(message)s"}},
                 "handlers": {"console": {**logging_node["handlers"]["console"], "stream": "ext://sys.stderr"}},
                 "root": {"level": "WARNING", "handlers": ["console"]}}
    ConfigStore.instance().store(group="hydra/job_logging", name="qspeech_rank", node=rank_node, provider="qspeech")


def _hydra_defaults(overrides: list[str]) -> list[str]:
    """qspeech's Hydra settings as overrides, each unless the command line sets it: the job is named
    qspeech (qspeech.log, help), with the help page and logging of _hydra_settings."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    ours = {"hydra.job.name": "qspeech", "hydra/help": "qspeech", "hydra/job_logging": "qspeech"}
    if not distributed.is_main():  # torchrun's other ranks write nothing into the run folder (.hydra, log)
        ours |= {"hydra/job_logging": "qspeech_rank", "hydra.output_subdir": "null"}
    return [f"{k}={v}" for k, v in ours.items() if k not in given]


def _quiet() -> None:
    """Library noise off in every process that runs a job (the CLI's and a launcher's workers)."""
    for noisy in ("s3prl", "alembic"):  # alembic: setup lines when Optuna loads its storage plugins
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # s3prl builds pos_conv with the old weight_norm API; the deprecation note is noise for users.
    warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)


def _missing_package(e: ModuleNotFoundError) -> QSpeechError | None:
    root = (e.name or "").split(".")[0]
    return QSpeechError(f"{root} is not installed: {INSTALL_HINTS[root]}") if root in INSTALL_HINTS else None


# ---------------------------------------------------------------- Hydra commands
def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _job(fn: Callable[[object, Path], object], failures: list[BaseException]) -> Callable[[DictConfig], object]:
    """Hydra's task function: `fn` gets the typed config and the run folder; what it returns goes back to
    Hydra (a sweeper's objective for `run`). Known errors: one line, exit 2; in a sweep a failed job is added
    to `failures`, returns None (a failed trial) and the others still run."""

    def task(cfg: DictConfig):
        from hydra.core.hydra_config import HydraConfig

        _quiet()
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            try:
                return fn(to_typed(cfg), run_dir)
            except ModuleNotFoundError as e:
                raise _missing_package(e) or e
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


def _completion(args: list[str]) -> str | None:
    """The shell-completion request among a command's arguments: Hydra's `-sc` flag takes its mode as an
    override-like word (install=bash, uninstall=bash, query=bash); None without -sc."""
    if not any(a in ("-sc", "--shell-completion") for a in args):
        return None
    return next((a for a in args if a.split("=", 1)[0] in ("install", "uninstall", "query")), "install=bash")


def launch(config_name: str, command: str, argv: list[str], fn: Callable[[object, Path], object]) -> None:
    import hydra

    _register_resolvers()
    _hydra_settings(command)
    try:
        overrides, flags, info_only = hydra_args(argv)
        overrides += _hydra_defaults(overrides)
        if not info_only:
            overrides.append(f"command={command}")
            prints_only = any(f in ("-c", "--cfg") or f.startswith("--cfg=") for f in flags)  # --cfg writes nothing
            precheck(config_name, overrides, check_outputs=not prints_only)
    except QSpeechError as e:
        fail(str(e))
    failures: list[BaseException] = []
    main = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(_job(fn, failures))
    # Hydra's parser: overrides first, then flags. argv[0] names the program in Hydra's completion script,
    # which must register `qspeech` (one command) and call `qspeech -sc query=...` (see main).
    program = "qspeech" if _completion(flags) else f"qspeech {command}"  # -sc is a flag, its mode an override
    sys.argv = [program, *overrides, *flags]
    main()
    if failures:
        sys.exit(EXIT_USER_ERROR if all(isinstance(e, QSpeechError) for e in failures) else 1)


def _objective(cfg: RunConfig, result) -> float | list[float]:
    """What a sweeper optimises (cfg.optimized_metric): the dev score of the task's metric ("dev"), another
    dev_<metric>, or an accounting value; NaN when the run has no such number (a failed trial)."""
    names = cfg.optimized_metric if isinstance(cfg.optimized_metric, list) else [cfg.optimized_metric]
    values = []
    for name in names:
        if name == "dev" or name.startswith("dev_"):
            value = None if result.metrics is None else (
                result.metrics.dev_value if name == "dev" else getattr(result.metrics, name, None))
            if value is None:
                raise ConfigError(f"optimized_metric={name}: task {result.task} reports no such dev score")
        else:
            value = getattr(result, name)
        values.append(float("nan") if value is None else float(value))
    return values if isinstance(cfg.optimized_metric, list) else values[0]


def _final_metrics(result) -> dict[str, float]:
    """A finished run's numbers for the experiment logger."""
    out = {f"final/{k}": getattr(result, k) for k in ("storage_mb", "est_runtime", "params", "quantized_params")}
    if result.metrics is not None:
        m = result.metrics
        out |= {f"final/test_{m.metric}": m.value, f"final/dev_{m.metric}": m.dev_value,
                "final/best_step": m.best_step}
    return {k: float(v) for k, v in out.items() if v is not None}


def _cmd_run(cfg: RunConfig, run_dir: Path) -> float | list[float]:
    from qspeech import loggers
    from qspeech.runner import run

    if not distributed.is_main():  # torchrun's other ranks: rank 0 logs and reports the run
        return _objective(cfg, run(cfg, run_dir))
    params = loggers.flatten(dataclasses.asdict(cfg))
    with loggers.session(cfg.logger, run_dir, run_dir.name, params) as logger:
        result = run(cfg, run_dir)
        logger.log_metrics(_final_metrics(result), step=(result.metrics.steps or 0) if result.metrics else 0)
    metric = f"{result.metric}={result.value:.2f}" if result.value is not None else ""
    quant = "full precision" if int(cfg.bits) >= 32 else f"{cfg.quant.method} {cfg.bits}-bit"
    log.info(f"[qspeech] {cfg.model.name} {quant} {cfg.task.name}: {metric} "
             f"storage {result.storage_mb:.2f} MB, est. runtime {result.est_runtime:.3f} -> {run_dir}/result.json")
    return _objective(cfg, result)


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
    log.info(f"-> {run_dir / COST_FILE}")
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
    p.error = _flag_error
    args = p.parse_args(argv)
    from qspeech.report import make_report

    out = make_report(args.outputs)
    for problem in out["problems"]:
        print(f"qspeech: warning: {problem}", file=sys.stderr)
    print(Path(out["markdown"]).read_text())
    written = [out["csv"], out["markdown"], out["plot"], out["superb_csv"], out["superb_plot"]]
    print(f"{out['runs']} runs -> {', '.join(str(p) for p in written if p)}")


def _cmd_assets(argv: list[str]) -> None:
    from qspeech.pretrain import build_assets

    build_assets(argv)


def _cmd_demo(argv: list[str]) -> None:
    from qspeech.demo import main as demo_main

    demo_main(argv)


def _cmd_search(cfg, run_dir: Path):
    from qspeech.search import main as search_main

    return search_main(cfg, run_dir)


# command -> (its primary config in conf/, the function that gets the typed config and the run folder)
HYDRA_COMMANDS = {
    "run": ("config", _cmd_run),
    "cost": ("config", _cmd_cost),
    "export": ("config", _cmd_export),
    "bench": ("config", _cmd_bench),
    "data": ("config", _cmd_data),
    "pretrain": ("pretrain", _cmd_pretrain),
    "distill": ("distill", _cmd_distill),
    "search": ("search", _cmd_search),
}
PLAIN_COMMANDS = {"report": _cmd_report, "assets": _cmd_assets, "demo": _cmd_demo}


def _complete(argv: list[str]) -> None:
    """`qspeech -sc install=bash | query=bash | ...`. Install/uninstall print Hydra's script for the program
    `qspeech`. A query (what that script runs on <TAB>, the line in COMP_LINE) completes the command word
    itself, or hands the rest of the line to the command's Hydra app (overrides, groups, options), whose
    answer loses the schema entries that only type the groups."""
    import contextlib
    import io
    import os

    from qspeech.completion import hide_schemas, split_line

    if not (_completion(argv) or "").startswith("query="):
        launch("config", "run", argv, _cmd_run)
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
    _quiet()
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

