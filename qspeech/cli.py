"""`qspeech <command>`: subcommand dispatch. Hydra commands (run, cost, data, pretrain, distill) take
Hydra overrides; known errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
import traceback
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qspeech.config import CONF_DIR, GROUPS, group_options
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

_FAILURES: list[BaseException] = []
# Hydra flags that take a value (so the value is not an override).
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun"}
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "--version", "--shell-completion", "-sc"}


def fail(msg: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"qspeech: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _register_resolvers() -> None:
    from qspeech.runner import run_id

    def run_name(*, _root_: DictConfig) -> str:
        cfg = OmegaConf.masked_copy(_root_, [k for k in _root_.keys() if k not in ("hydra", "cache_dir")])
        quant = "fp" if int(cfg.bits) >= 32 else cfg.quant.method
        init = "" if cfg.model.get("init", "pretrained") == "pretrained" else f"-{cfg.model.init}"
        task = cfg.task.name if "task" in cfg else "none"
        data = cfg.data.name if "data" in cfg else "none"
        return f"{cfg.model.name}{init}_{quant}_b{cfg.bits}_{task}_{data}_{run_id(cfg)}"

    if not OmegaConf.has_resolver("qspeech_run_name"):
        OmegaConf.register_new_resolver("qspeech_run_name", run_name)


# ---------------------------------------------------------------- checking overrides before Hydra runs
def _split_args(argv: list[str]) -> tuple[list[str], bool]:
    """(overrides, info_only): Hydra flags and their values removed."""
    overrides, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in _INFO_FLAGS or a.startswith("--info"):
            return [], True
        if a in _VALUE_FLAGS:
            skip = True
            continue
        if a.startswith("-"):
            continue
        overrides.append(a)
    return overrides, False


def precheck(config_name: str, argv: list[str], validate_fn: Callable[[DictConfig], None] | None) -> None:
    """Compose the config for every value of every sweep parameter and validate it, so a bad value is
    one clear line (exit 2) before any job of a sweep starts."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides, info_only = _split_args(argv)
    if info_only:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]}") from None
    base: list[str] = []
    sweeps: list[tuple[str, list[str]]] = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # glob / range sweeps over groups: leave them to Hydra
                base.append(o.input_line)
                continue
            sweeps.append((key, values))
            base.append(f"{key}={values[0]}")
        else:
            base.append(o.input_line)
        group = key.lstrip("+~")
        if group in GROUPS and not o.is_delete():
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
            for v in values:
                if v is not None and str(v) not in group_options(group):
                    raise ConfigError(f"{group}={v}: no such option; choose one of {', '.join(group_options(group))}")
    variants = [base]
    for key, values in sweeps:
        for v in values[1:]:
            variants.append([f"{key}={v}" if s.split("=", 1)[0] == key else s for s in base])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="qspeech"):
        for ov in variants:
            try:
                cfg = compose(config_name=config_name, overrides=ov)
            except (HydraException, OmegaConfBaseException) as e:
                msg = " ".join(str(e).split())
                shown = " ".join(o for o in ov if not o.startswith("command="))
                raise ConfigError(f"bad override ({shown}): {msg[:300]}") from None
            if validate_fn is not None:
                validate_fn(cfg)


# ---------------------------------------------------------------- Hydra commands
def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _guarded(fn: Callable[[DictConfig, Path], object]) -> Callable[[DictConfig], object]:
    """Known errors: one line, exit 2. In a sweep, a failed job is recorded and the others still run."""

    def task(cfg: DictConfig):
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            return fn(cfg, run_dir)
        except QSpeechError as e:
            print(f"qspeech: error: {e}", file=sys.stderr)
            _FAILURES.append(e)
            if not _is_multirun():
                sys.exit(EXIT_USER_ERROR)
        except Exception as e:
            if not _is_multirun():
                raise
            traceback.print_exc()
            _FAILURES.append(e)
        return None

    return task


def launch(config_name: str, command: str, argv: list[str], fn: Callable[[DictConfig, Path], object],
           validate_fn: Callable[[DictConfig], None] | None) -> None:
    import hydra

    _register_resolvers()
    argv = list(argv)
    if not _split_args(argv)[1]:
        argv.append(f"command={command}")
    try:
        precheck(config_name, argv, validate_fn)
    except QSpeechError as e:
        fail(str(e))
    main = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(_guarded(fn))
    sys.argv = [f"qspeech {command}"] + argv
    main()
    if _FAILURES:
        sys.exit(EXIT_USER_ERROR if all(isinstance(e, QSpeechError) for e in _FAILURES) else 1)


def _validate_run(cfg: DictConfig) -> None:
    from qspeech.config import validate

    validate(cfg)


def _validate_cost(cfg: DictConfig) -> None:
    from qspeech.config import validate

    validate(cfg, stages=("model", "quant"))


def _cmd_run(cfg: DictConfig, run_dir: Path) -> dict:
    from qspeech.runner import run

    result = run(cfg, run_dir)
    metric = f"{result.get('metric')}={result.get('value'):.2f}" if result.get("value") is not None else ""
    print(f"[qspeech] {cfg.model.name} {cfg.quant.method} {cfg.bits}-bit {cfg.task.name}: {metric} "
          f"storage {result['storage_mb']:.2f} MB, est. runtime {result['est_runtime']:.3f} -> {run_dir}/result.json")
    return result


def _cmd_cost(cfg: DictConfig, run_dir: Path) -> dict:
    from qspeech.cost import format_table
    from qspeech.results import COST_FILE
    from qspeech.runner import compute_cost, write_cost
    from qspeech.seeding import seed_everything
    from qspeech.upstream import build_upstream

    seed_everything(int(cfg.seed))
    model_cfg = cfg.model.copy()
    if not model_cfg.get("ckpt"):  # accounting needs the architecture only: no download
        model_cfg.init = "random"
    report = compute_cost(cfg, build_upstream(model_cfg))
    print(format_table(report))
    out = write_cost(cfg, report, run_dir)
    print(f"-> {run_dir / COST_FILE}")
    return out


def _cmd_export(cfg: DictConfig, run_dir: Path):
    from qspeech.quant.export import main as export_main

    return export_main(cfg, run_dir)


def _cmd_bench(cfg: DictConfig, run_dir: Path):
    from qspeech.bench import main as bench_main

    return bench_main(cfg, run_dir)


def _cmd_data(cfg: DictConfig, run_dir: Path) -> dict:
    import json

    from qspeech.data import prepare

    summary = prepare(cfg.data, cfg.cache_dir)
    print(json.dumps(summary, indent=2, default=str))
    return summary


def _validate_pretrain(cfg: DictConfig) -> None:
    from qspeech.pretrain import hubert

    hubert.validate(cfg)


def _validate_distill(cfg: DictConfig) -> None:
    from qspeech.pretrain import distill

    distill.validate(cfg)


def _cmd_pretrain(cfg: DictConfig, run_dir: Path):
    from qspeech.pretrain import hubert

    return hubert.main(cfg)


def _cmd_distill(cfg: DictConfig, run_dir: Path):
    from qspeech.pretrain import distill

    return distill.main(cfg)


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


HYDRA_COMMANDS = {
    "run": ("config", _cmd_run, _validate_run),
    "cost": ("config", _cmd_cost, _validate_cost),
    "export": ("config", _cmd_export, _validate_cost),
    "bench": ("config", _cmd_bench, _validate_cost),
    "data": ("config", _cmd_data, None),
    "pretrain": ("pretrain", _cmd_pretrain, _validate_pretrain),
    "distill": ("distill", _cmd_distill, _validate_distill),
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
        config_name, fn, validate_fn = HYDRA_COMMANDS[command]
        launch(config_name, command, rest, fn, validate_fn)
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

