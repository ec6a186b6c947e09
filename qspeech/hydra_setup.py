"""Hydra as qspeech uses it: the command line split into overrides and flags (in any order), the shell-completion
request among them, and qspeech's own Hydra settings (the help page, job logging, the job's name, the
run-folder resolver) given to every Hydra command."""

from __future__ import annotations

import logging
import warnings

from hydra._internal.utils import get_args_parser
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from qspeech import distributed
from qspeech.config import GROUPS, group_options, to_typed
from qspeech.errors import ConfigError
from qspeech.identity import run_name

__all__ = ["completion_mode", "flag_error", "hydra_args", "hydra_defaults", "quiet", "register_resolvers",
           "store_settings"]


def flag_error(message: str):
    """argparse's error hook: one line naming --help (argparse would print its whole usage)."""
    raise ConfigError(f"{message} (see --help)")


def hydra_args(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """(overrides, flags, info_only): argv split by Hydra's own parser, so flags may come before, between or
    after the overrides. info_only: a flag that only prints (--help, --info, ...), no job runs."""
    parser = get_args_parser()
    parser.error = flag_error
    args = parser.parse_intermixed_args(argv)
    overrides, flags, i = list(args.overrides), [], 0
    for a in argv:
        if i < len(overrides) and a == overrides[i]:
            i += 1
        else:
            flags.append(a)
    return overrides, flags, bool(args.help or args.hydra_help or args.info or args.shell_completion)


def completion_mode(args: list[str]) -> str | None:
    """The shell-completion request among a command's arguments: Hydra's `-sc` flag takes its mode as an
    override-like word (install=bash, uninstall=bash, query=bash); None without -sc."""
    if not any(a in ("-sc", "--shell-completion") for a in args):
        return None
    return next((a for a in args if a.split("=", 1)[0] in ("install", "uninstall", "query")), "install=bash")


def register_resolvers() -> None:
    """${qspeech_run_name:}: the run folder's name (qspeech.identity.run_name of the typed config)."""

    def resolve_run_name(*, _root_: DictConfig) -> str:
        return run_name(to_typed(_root_))

    if not OmegaConf.has_resolver("qspeech_run_name"):
        OmegaConf.register_new_resolver("qspeech_run_name", resolve_run_name)


def store_settings(command: str) -> None:
    """Hydra config nodes of qspeech's own (ConfigStore): the help page (headed qspeech, the config groups
    without the schema entries that only type them) and job logging (plain console lines; every message,
    progress and results included, also in <run>/qspeech.log; s3prl's INFO dumps silenced in every job,
    launcher workers included)."""
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


def hydra_defaults(overrides: list[str]) -> list[str]:
    """qspeech's Hydra settings as overrides, each unless the command line sets it: the job is named
    qspeech (qspeech.log, help), with the help page and logging of store_settings."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    ours = {"hydra.job.name": "qspeech", "hydra/help": "qspeech", "hydra/job_logging": "qspeech"}
    if not distributed.is_main():  # torchrun's other ranks write nothing into the run folder (.hydra, log)
        ours |= {"hydra/job_logging": "qspeech_rank", "hydra.output_subdir": "null"}
    return [f"{k}={v}" for k, v in ours.items() if k not in given]


def quiet() -> None:
    """Library noise off in every process that runs a job (the CLI's and a launcher's workers)."""
    for noisy in ("s3prl", "alembic"):  # alembic: setup lines when Optuna loads its storage plugins
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # s3prl builds pos_conv with the old weight_norm API; the deprecation note is noise for users.
    warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
