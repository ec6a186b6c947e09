"""The config schema: every key of conf/ as a typed dataclass field, checked once, before any work starts.

Each group's dataclass lives with its stage: ModelConfig in qspeech/upstream/config.py, DataConfig in
qspeech/data/config.py, TrainConfig in qspeech/train.py, TaskConfig and one class per task kind (ASRConfig in
qspeech/tasks/asr.py), QuantConfig and one class per method in qspeech/quant/ (the pretrain / distill roots
in qspeech/pretrain/config.py). This module adds the root RunConfig (conf/config.yaml) and registers them all
in Hydra's ConfigStore: each conf/<group>/<option>.yaml starts with `defaults: [_schema, _self_]` (a group of
one dataclass) or `[_schema_<kind>, _self_]` (a class per quant method or task kind), conf/config.yaml with
`_run_schema`, so that composing checks every key and type. `to_typed` then builds the dataclasses, whose
__post_init__ check the values (RunConfig's the rules across groups). The CLI does both for every value of a
sweep before any job starts; stages receive the typed objects and check nothing again.

Defaults: a dataclass's defaults are the values of one YAML option, its own: the option named after its kind
(task/asr, quant/<method>); TrainConfig's and DataConfig's are the default option's (train/cpu, data/mini);
ModelConfig's are model/hubert's (HuBERT Base: its arch_cfg default stays empty, as composing merges an
option's dict into it and cannot remove keys). RunConfig's are conf/config.yaml's. tests/test_configs.py
checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, open_dict

import qspeech.quant.methods  # noqa: F401 - registers the built-in methods, whose schemas are stored below
from qspeech.checks import instantiate, integer, need, number
from qspeech.data.config import DataConfig
from qspeech.loggers import LoggerConfig
from qspeech.quant.config import QuantConfig, check_bits
from qspeech.quant.registry import quant_schemas
from qspeech.tasks import TaskConfig, task_schemas
from qspeech.train import TrainConfig
from qspeech.upstream.config import ModelConfig
from qspeech.identity import outside, runtime



def _conf_dir() -> Path:
    """The config folder: qspeech/conf inside an installed wheel (setup.py maps the repository's top-level
    conf/ there), else the checkout's conf/ beside the package (editable installs, running from the repo).
    The packaged copy is looked for first: a stray top-level `conf` in site-packages is never ours."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if (packaged / "config.yaml").is_file() else here.parent / "conf"


CONF_DIR = _conf_dir()
GROUPS = ("model", "quant", "task", "data", "train", "eval_data", "quant_audio", "experiment", "logger",
          "hparams_search")
BITS = (1, 2, 3, 4, 8, 16, 32)
# What a sweeper may optimise (optimized_metric): a dev score, or the accounting of result.json. Never a test
# score: the test set is reported once, for the configuration the dev set chose.
ACCOUNTING_METRICS = ("storage_mb", "est_runtime", "params", "quantized_params", "macs")

__all__ = ["ACCOUNTING_METRICS", "BITS", "CONF_DIR", "GROUPS", "BenchConfig", "CostConfig", "RunConfig", "group_options", "output_dir",
           "register_schema", "to_typed"]


@dataclass
class CostConfig:
    # Reference input length for MAC counts (the paper's runtime estimate is relative, so any length works).
    seconds: float = 10.0

    def __post_init__(self):
        number(self, "seconds", 0, lo_open=True)


@dataclass
class BenchConfig:
    """`qspeech bench`: measured latency of the upstream forward (batch x seconds of audio)."""

    seconds: float = 10.0
    batch: int = 1
    threads: int | None = None  # null: torch's default; recorded in bench.json
    repeats: int = 5
    warmup: int = 1
    # null: the run's bits, or 8, 4, 2 and 1 when bits=32; one bit width or a list (bench.bits=[4,2]).
    bits: Any = None
    variants: list[str] | None = None  # null: all
    onnx: bool = True  # also time onnxruntime fp32 / MatMulNBits
    cnn_int8: bool = True  # also an int8 variant with the CNN front end in int8

    def __post_init__(self):
        number(self, "seconds", 0, lo_open=True)
        integer(self, "batch", 1)
        integer(self, "threads", 1, optional=True)
        integer(self, "repeats", 1)
        integer(self, "warmup", 0)
        bits = [self.bits] if isinstance(self.bits, int) and not isinstance(self.bits, bool) else self.bits
        need(bits is None or (isinstance(bits, list) and all(b in BITS[:-1] and not isinstance(b, bool)
                                                             for b in bits)),
             "bits", self.bits, f"must be null, or bit widths (a list) among {', '.join(map(str, BITS[:-1]))}")
        self.bits = bits


@dataclass
class RunConfig:
    """conf/config.yaml: `qspeech run | cost | export | bench | data`."""

    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    data: DataConfig = MISSING
    train: TrainConfig = MISSING
    task: TaskConfig = MISSING
    # A second test set scored by the trained head after the run (conf/eval_data/); None = none.
    eval_data: Optional[DataConfig] = None
    # The audio QAT distils on (conf/quant_audio/; its training split); None = the head's data. The paper distils
    # every task's upstream on LibriSpeech, so KS, SID and IC share one student with quant_audio=librispeech.
    quant_audio: Optional[DataConfig] = None
    # Weight bits of the quantized modules (32 = full precision, no quantization).
    bits: int = 32
    seed: int = 0
    # Set by the CLI (run | cost | data | ...); names the output folder.
    command: str = outside("run")
    # Caches shared between runs: the synthesized corpus, upstream features, distilled quantized upstreams.
    cache_dir: str = outside(MISSING)
    cost: CostConfig = runtime(default_factory=CostConfig)
    export: bool = runtime(True)  # write the bit-packed upstream (safetensors) at the end of a run
    bench: BenchConfig = runtime(default_factory=BenchConfig)
    logger: LoggerConfig = outside(default_factory=LoggerConfig)
    # What `qspeech run` returns to a sweeper (conf/hparams_search/): "dev" (the dev score of the task's
    # metric, e.g. dev WER), another dev_<metric> the task reports, or an accounting value (storage_mb,
    # est_runtime, ...); a list of them for a multi-objective sweep. Never a test score.
    optimized_metric: Any = outside("dev")

    def __post_init__(self):
        need(self.bits in BITS and not isinstance(self.bits, bool), "bits", self.bits,
             f"is not supported; choose one of {', '.join(map(str, BITS))} (32 = full precision)")
        integer(self, "seed", 0)
        check_bits(self.quant.method, self.bits)  # what the method implements
        names = self.optimized_metric if isinstance(self.optimized_metric, list) else [self.optimized_metric]
        need(bool(names) and all(isinstance(n, str) and (n == "dev" or n.startswith("dev_") or n in ACCOUNTING_METRICS)
                                 for n in names), "optimized_metric", self.optimized_metric,
             f"must be dev, dev_<metric> or one of {', '.join(ACCOUNTING_METRICS)} (or a list of them); "
             f"never a test score")


def register_schema(name: str, node: type, group: str | None = None) -> None:
    ConfigStore.instance().store(name=name, node=node, group=group)


def _register() -> None:
    register_schema("_run_schema", RunConfig)
    register_schema("_schema", ModelConfig, "model")
    register_schema("_schema", TrainConfig, "train")
    register_schema("_schema", DataConfig, "data")
    register_schema("_schema", LoggerConfig, "logger")
    for group, schemas in (("quant", quant_schemas()), ("task", task_schemas())):
        for kind, schema in schemas.items():
            register_schema(f"_schema_{kind}", schema, group)


def to_typed(cfg: DictConfig) -> Any:
    """The composed config (conf/config.yaml: a RunConfig; pretrain.yaml, distill.yaml: see
    qspeech.pretrain.config) as dataclasses, every value checked; ConfigError naming the key otherwise."""
    if "hydra" in cfg:
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.pop("hydra")
    return instantiate(cfg)


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


_register()
