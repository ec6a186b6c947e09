"""Every config in conf/ composes and validates (lightning-hydra-template style)."""

import pytest
from hydra import compose, initialize_config_dir

from qspeech.config import CONF_DIR, group_options, validate
from qspeech.errors import ConfigError


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("group", ["model", "quant", "task", "data", "train"])
def test_every_option_composes_and_validates(group):
    for option in group_options(group):
        cfg = _compose([f"{group}={option}"])
        bits = 2 if group == "quant" else 32
        cfg.bits = bits
        validate(cfg, stages=("model", "quant")) if group in ("model", "quant") else validate(cfg)


@pytest.mark.parametrize("experiment", group_options("experiment") or ["__none__"])
def test_every_experiment_composes(experiment):
    if experiment == "__none__":
        pytest.skip("no experiment recipes")
    validate(_compose([f"experiment={experiment}"]))


@pytest.mark.parametrize("bits", [0, 5, 7, 64, -1])
def test_bad_bits_rejected(bits):
    cfg = _compose([f"bits={bits}"])
    with pytest.raises(ConfigError, match=f"bits={bits} is not supported"):
        validate(cfg)


def test_default_config_is_the_offline_study():
    cfg = _compose([])
    assert (cfg.model.name, cfg.task.name, cfg.data.name, cfg.bits) == ("tiny_hubert", "asr_small", "mini", 32)
