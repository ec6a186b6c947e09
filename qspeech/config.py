"""Config schema and validation: every composed config is checked before any work starts.

Each stage owns the schema of its own group (qspeech.data, qspeech.quant, qspeech.tasks); this module
checks the top level and the model group, and calls the stage validators.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qspeech.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "quant", "task", "data", "train", "experiment")
BITS = (1, 2, 3, 4, 8, 16, 32)
ARCHS = ("hubert", "wav2vec2", "distiller", "wavlm")


@dataclass
class ModelConfig:
    name: str
    arch: str
    url: str | None = None
    ckpt: str | None = None
    init: str = "pretrained"
    trust_checkpoint: bool = False
    asset: str | None = None
    arch_cfg: dict[str, Any] = field(default_factory=dict)


def plain(cfg) -> dict:
    """A config node (DictConfig, mapping or None) as a plain dict, interpolations resolved."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg or {})


def check_keys(schema, d: dict, group: str) -> None:
    """ConfigError (one line) naming the keys of `d` that the dataclass `schema` does not have."""
    names = {f.name for f in fields(schema)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{group}: unknown key(s) {unknown}; known keys: {sorted(names)}")


def output_dir(run_dir=None, default=".") -> Path:
    """run_dir if given, else Hydra's output folder of the running job, else `default`; created."""
    if run_dir is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():
                run_dir = HydraConfig.get().runtime.output_dir
        except Exception:  # noqa: BLE001 - not under Hydra
            pass
    path = Path(run_dir if run_dir is not None else default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _check_schema(schema, node, group: str) -> None:
    try:
        OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{group}{'.' + str(key) if key else ''}: {msg}") from None


def validate_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ConfigError(
            f"bits={bits} is not supported; choose one of {', '.join(map(str, BITS))} (32 = full precision)"
        )
    return bits


def validate(cfg: DictConfig, stages: tuple[str, ...] = ("model", "quant", "task", "data", "train")) -> None:
    """Raise ConfigError (one line) for the first invalid value; `stages` limits what a command needs."""
    bits = validate_bits(cfg.get("bits"))
    if "model" in stages:
        _check_schema(ModelConfig, cfg.model, "model")
        if cfg.model.arch not in ARCHS:
            raise ConfigError(f"model.arch={cfg.model.arch} is unknown; choose one of {', '.join(ARCHS)}")
        if cfg.model.init not in ("pretrained", "random"):
            raise ConfigError(f"model.init={cfg.model.init}: choose pretrained or random")
    if float(cfg.get("cost", {}).get("seconds", 10.0)) <= 0:
        raise ConfigError(f"cost.seconds={cfg.cost.seconds} must be > 0")
    if "quant" in stages:
        from qspeech.quant import validate_quant_config

        validate_quant_config(cfg.quant, bits)
    if "data" in stages:
        from qspeech.data import validate_data_config

        validate_data_config(cfg.data, check_paths=False)  # paths are checked when data is loaded
    if "task" in stages:
        from qspeech.tasks import validate_task_config

        validate_task_config(cfg.task)
    if "train" in stages:
        from qspeech.tasks import validate_train_config

        validate_train_config(cfg.train)
