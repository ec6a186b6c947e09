"""Every config in conf/ composes and types (lightning-hydra-template style); the dataclasses' defaults are
their own YAML option's values; every key is typed; bad values name their key."""

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig
from omegaconf.nodes import AnyNode

import qspeech.pretrain.config as P
from qspeech.checks import typed
from qspeech.config import CONF_DIR, BenchConfig, CostConfig, RunConfig, group_options, to_typed
from qspeech.data.config import DataConfig, data_config
from qspeech.errors import ConfigError
from qspeech.loggers import LoggerConfig
from qspeech.quant.config import QuantConfig
from qspeech.quant.registry import get_method, quant_schemas
from qspeech.tasks import task_schemas
from qspeech.tasks import TaskConfig
from qspeech.train import TrainConfig
from qspeech.upstream.config import ModelConfig

GROUP_TYPES = {"model": ModelConfig, "quant": QuantConfig, "task": TaskConfig, "data": DataConfig,
               "train": TrainConfig, "logger": LoggerConfig, "eval_data": DataConfig}


def _compose(overrides, name="config"):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


def _quant_bits(method: str) -> int:
    """2 bits, or the lowest the method has (bit_exact: 1 bit only, as BiT's code)."""
    return 2 if 2 in get_method(method).weight_bits else min(get_method(method).weight_bits)


@pytest.mark.parametrize("group", sorted(GROUP_TYPES))
def test_every_option_composes_and_types(group):
    for option in group_options(group):
        overrides = [f"{group}={option}"] + ([f"bits={_quant_bits(option)}"] if group == "quant" else [])
        cfg = to_typed(_compose(overrides))
        assert isinstance(cfg, RunConfig) and isinstance(getattr(cfg, group), GROUP_TYPES[group])


@pytest.mark.parametrize("experiment", group_options("experiment") or ["__none__"])
def test_every_experiment_composes(experiment):
    if experiment == "__none__":
        pytest.skip("no experiment recipes")
    assert isinstance(to_typed(_compose([f"experiment={experiment}"])), RunConfig)


@pytest.mark.parametrize("experiment", ["demo", "superb_small"])
def test_an_experiment_sets_qat_fields_for_the_qat_methods_only(experiment):
    # `quant=rtn,bit` sweeps of one experiment: its distillation steps (conf/experiment_quant/) reach the
    # methods that have them, and a PTQ method's config (which has no steps) still composes
    for method in quant_schemas():
        cfg = to_typed(_compose([f"experiment={experiment}", f"quant={method}", f"bits={_quant_bits(method)}"]))
        assert cfg.quant.targets == ["linear", "cnn"]
        assert getattr(cfg.quant, "steps", None) == (150 if get_method(method).needs_distillation else None)


def test_hparams_search_composes_with_its_sweeper():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna", "experiment=smoke"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.optimized_metric == "dev"
    assert set(cfg.hydra.sweeper.params) == {"task.lr", "bits"}
    assert isinstance(to_typed(cfg), RunConfig)


@pytest.mark.parametrize("overrides", [["experiment=smoke", "data=manifest"], ["experiment=demo", "task=asr"],
                                       ["experiment=paper_asr", "bits=1"]])
def test_experiments_combine_with_other_options(overrides):
    # an experiment's data.mini settings stay valid (and unused) when the data option is another kind
    assert isinstance(to_typed(_compose(overrides)), RunConfig)


@pytest.mark.parametrize("name,schema", [("pretrain", P.PretrainRunConfig), ("distill", P.DistillRunConfig)])
def test_primary_recipes_compose_and_type(name, schema):
    assert isinstance(to_typed(_compose([], name)), schema)


@pytest.mark.parametrize("bits", [0, 5, 7, 64, -1])
def test_bad_bits_rejected(bits):
    cfg = _compose([f"bits={bits}"])
    with pytest.raises(ConfigError, match=f"bits={bits} is not supported"):
        to_typed(cfg)


def test_default_config_is_the_offline_study():
    cfg = to_typed(_compose([]))
    assert (cfg.model.name, cfg.task.name, cfg.data.name, cfg.bits) == ("tiny_hubert", "asr_small", "mini", 32)
    assert cfg.data == DataConfig()


# --------------------------------------------------------------------------------------- defaults agree
def _own_options():
    """(dataclass, its own option): the option named after its kind for a class per kind; otherwise the
    option the class's docstring names (see qspeech/config.py)."""
    own = [(ModelConfig, "model=hubert"), (TrainConfig, "train=cpu"), (DataConfig, "data=mini"),
           (LoggerConfig, "logger=csv")]
    own += [(cls, f"quant={method}") for method, cls in quant_schemas().items()]
    own += [(cls, f"task={kind}") for kind, cls in task_schemas().items()]
    return own


@pytest.mark.parametrize("schema,option", _own_options(), ids=lambda x: getattr(x, "__name__", x))
def test_dataclass_defaults_are_their_own_yaml(schema, option):
    group = option.split("=")[0]
    overrides = [option] + ([f"bits={_quant_bits(option.split('=')[1])}"] if group == "quant" else [])
    composed = getattr(to_typed(_compose(overrides)), group)
    assert type(composed) is schema
    assert dataclasses.asdict(composed) == dataclasses.asdict(schema())


def test_root_defaults_are_the_yaml():
    cfg = to_typed(_compose([]))
    for f in dataclasses.fields(RunConfig):
        if f.name not in (*GROUP_TYPES, "cache_dir"):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert getattr(cfg, f.name) == default, f.name
    assert (cfg.cost, cfg.bench) == (CostConfig(), BenchConfig())
    for name, schema in (("pretrain", P.PretrainRunConfig), ("distill", P.DistillRunConfig)):
        recipe = to_typed(_compose([], name))
        assert getattr(recipe, name) == schema.__dataclass_fields__[name].default_factory()
        assert (recipe.seed, recipe.threads, recipe.install, recipe.run_dir) == (0, 1, False, None)


# --------------------------------------------------------------------------------------- every key typed
# Keys whose values are free-form by design: s3prl's architecture settings, split sources (a name or a list),
# and values that are a choice of types (checked in __post_init__).
UNTYPED = ("model.arch_cfg", "teacher.arch_cfg", "data.splits", "train.cache_features", "bench.bits",
           "optimized_metric")


def _untyped_keys(node, path=""):
    """Keys whose node accepts any type (AnyNode: no schema field behind it)."""
    out = []
    is_list = isinstance(node, ListConfig)
    for k in (range(len(node)) if is_list else node.keys()):
        key = f"{path}[{k}]" if is_list else (f"{path}.{k}" if path else str(k))
        child = node._get_node(k)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_none():
            out += _untyped_keys(child, key)
        elif isinstance(child, AnyNode):
            out.append(key)
    return out


@pytest.mark.parametrize("name,overrides", [("config", []), ("config", ["task=asr"]), ("config", ["data=manifest"]),
                                            ("config", ["quant=bit"]), ("pretrain", []), ("distill", [])])
def test_every_key_is_typed(name, overrides):
    untyped = [k for k in _untyped_keys(_compose(overrides, name)) if not k.startswith(UNTYPED)]
    assert not untyped, f"keys without a schema type: {untyped}"


# --------------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("override,needle", [
    ("seed=abc", "seed=abc: must be an integer"),
    ("train.max_steps=-1", "train.max_steps=-1: must be an integer >= 1"),
    ("train.warmup_steps=1500", "train.warmup_steps=1500"),
    ("train.batch_size=2.5", "train.batch_size=2.5: must be an integer"),
    ("data.mini.rate=[500,600]", "data.mini.rate=[500.0,600.0]"),
    ("task.dropout=1.5", "task.dropout=1.5"),
    ("model.init=warm", "model.init=warm"),
    ("data.kind=nope", "data.kind=nope is unknown"),
    ("cost.seconds=0", "cost.seconds"),
    ("bench.bits=[4,5]", "bench.bits"),
    ("logger=csv logger.name=neptune", "logger.name=neptune"),
    ("optimized_metric=wer", "never a test score"),
    ("optimized_metric=[dev,value]", "optimized_metric"),
])
def test_bad_value_names_its_key(override, needle):
    from omegaconf.errors import OmegaConfBaseException

    from qspeech.checks import describe

    try:
        cfg = _compose(override.split())
    except Exception as e:  # a type error: Hydra refuses the override itself (the CLI describes it)
        cause = e.__cause__
        assert isinstance(cause, OmegaConfBaseException)
        assert needle in describe(cause)
        return
    with pytest.raises(ConfigError) as e:
        to_typed(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_typed_from_a_mapping_checks_like_composition():
    assert typed(TrainConfig, {"max_steps": 10}, "train").max_steps == 10
    with pytest.raises(ConfigError, match="train.bogus: unknown key"):
        typed(TrainConfig, {"bogus": 1}, "train")
    with pytest.raises(ConfigError, match="train.max_steps=x: must be an integer"):
        typed(TrainConfig, {"max_steps": "x"}, "train")
    with pytest.raises(ConfigError, match="unknown data.kind"):
        data_config({"name": "x", "kind": "nope"})
    assert data_config({"name": "m", "kind": "mini"}) == DataConfig(name="m")


@pytest.mark.parametrize("launcher", sorted(p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml")))
def test_launcher_configs_compose_on_the_submitit_plugin(launcher):
    # conf/hydra/launcher/ builds on Hydra's submitit launcher (the `slurm` extra; the `test` extra has it)
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "experiment=smoke"], return_hydra_config=True)
    la = cfg.hydra.launcher
    assert la._target_.endswith("SlurmLauncher")
    assert la.max_num_timeout > 0 and la.timeout_min > 0 and la.signal_delay_s > 0  # requeued at the limit
    assert la.cpus_per_task and la.mem_gb and la.array_parallelism
    assert (la.gpus_per_node is None) == launcher.endswith("_cpu")
    assert isinstance(to_typed(cfg), RunConfig)
