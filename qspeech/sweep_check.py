"""The pre-check of a Hydra command: the config of every job of a sweep composed and typed before the first
starts, so that a bad value, a missing launcher or sweeper plugin, or an unwritable output folder is one clear
line (exit 2) instead of a failure halfway through a sweep."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, IntervalSweep
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qspeech.atomic import folder_problem
from qspeech.checks import describe
from qspeech.config import CONF_DIR, GROUPS, RunConfig, group_options, to_typed
from qspeech.errors import ConfigError, StorageError
from qspeech.loggers import check_available

__all__ = ["check_output_folders", "precheck", "sweep_values", "sweep_variants"]
# Hydra plugins a config may name, and the package that provides each.
PLUGINS = (("hydra/sweeper/optuna", "hydra-optuna-sweeper"), ("hydra/launcher/joblib", "hydra-joblib-launcher"),
           ("hydra/launcher/submitit", "hydra-submitit-launcher"))


def sweep_values(o) -> list[str] | None:
    """The values of a sweep override that the pre-check composes: every value of a choice or a range, both
    ends of an interval (what lies between obeys the same range checks), the matching options of a glob over
    a config group; None: nothing to expand (a glob over anything else)."""
    value = o.value()
    if isinstance(value, IntervalSweep):  # a sweeper's search space (Optuna, Nevergrad, ...)
        return [repr(value.start), repr(value.end)]
    if isinstance(value, Glob):
        group = o.get_key_element().lstrip("+~")
        return value.filter(group_options(group)) if group in GROUPS else None
    return list(o.sweep_string_iterator())


def _check_group_options(o, values: list[str] | None) -> None:
    """ConfigError for a config group option that conf/ does not have."""
    group = o.get_key_element().lstrip("+~")
    if group not in GROUPS or o.is_delete():
        return
    for v in values if values is not None else ([] if o.is_sweep_override() else [o.value()]):
        if v is not None and str(v) not in group_options(group):
            raise ConfigError(f"{group}={v}: no such option; choose one of {', '.join(group_options(group))}")


def sweep_variants(overrides: list[str], params: dict | None = None) -> list[list[str]]:
    """The override lists of a sweep: the first value of every swept key, then each other value of one key
    (every value of every key is composed once). `params`: a sweeper's search space from the config
    (hydra.sweeper.params), for keys the command line does not set. Group options are checked against
    conf/ first."""
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
        values = sweep_values(o) if o.is_sweep_override() else None
        if values:
            sweeps.append((key, values))
            base.append(f"{key}={values[0]}")
        elif not o.is_sweep_override():
            base.append(o.input_line)
        _check_group_options(o, values)
    variants = [base]
    for key, values in sweeps:
        for v in values[1:]:
            variants.append([f"{key}={v}" if s.split("=", 1)[0] == key else s for s in base])
    return variants


def compose_error(e: Exception, overrides: list[str]) -> str:
    """Hydra's or OmegaConf's composing error as one line: the key and value at fault, the plugin to install,
    or the overrides that could not be composed."""
    cause = e if isinstance(e, OmegaConfBaseException) else e.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return describe(cause)
    msg = " ".join(str(e).split())
    for plugin, package in PLUGINS:
        if f"'{plugin}" in msg:
            return f"{plugin.split('/')[1]} '{plugin.split('/')[2]}' is not installed: pip install {package}"
    shown = " ".join(o for o in overrides if not o.startswith("command="))
    return f"bad override ({shown}): {msg[:300]}"


def check_output_folders(cfg: DictConfig) -> None:
    """StorageError (one line) if Hydra could not create or write the run / sweep folder of a composed
    config (with its hydra node): Hydra opens its log file there before any qspeech code runs."""
    for key in ("run.dir", "sweep.dir"):
        try:
            folder = str(OmegaConf.select(cfg, f"hydra.{key}", throw_on_missing=True))
        except Exception:  # noqa: BLE001 - a folder name Hydra resolves itself at run time: its own check
            continue
        problem = folder_problem(folder)
        if problem:
            raise StorageError(f"output folder {folder}: {problem}; run from a writable folder or set "
                               f"hydra.{key}=/a/writable/folder")


def _typed(config_name: str, overrides: list[str], check_outputs: bool) -> DictConfig:
    """One job's config composed (with its hydra node) and typed (to_typed checks every value)."""
    try:
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(compose_error(e, overrides)) from None
    typed_cfg = to_typed(cfg)
    if check_outputs:
        check_output_folders(cfg)
    if isinstance(typed_cfg, RunConfig) and "command=run" in overrides:
        check_available(typed_cfg.logger)
    return cfg


def precheck(config_name: str, overrides: list[str], check_outputs: bool = True) -> None:
    """Compose the config for every value of every sweep parameter (the command line's and the config's
    hydra.sweeper.params) and type it, so a bad value is one clear line (exit 2) before any job of a sweep
    starts. Hydra's own settings are composed as they are."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="qspeech"):
        first, *others = sweep_variants(overrides)
        params = _typed(config_name, first, check_outputs).hydra.sweeper.get("params")
        params = OmegaConf.to_container(params) if params else {}
        variants = sweep_variants(overrides, params) if params else [first, *others]
        for ov in variants if params else others:
            _typed(config_name, ov, check_outputs)
