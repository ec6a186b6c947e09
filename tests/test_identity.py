"""One run identity (qspeech.identity): which fields change a run's folder, resume and cache keys is declared
on the dataclass fields, and every hash reads it there."""

import dataclasses

import pytest
from hydra import compose, initialize_config_dir

from qspeech.config import CONF_DIR, to_typed
from qspeech.identity import OUTSIDE, RESULT, field_kind, identity_dict, outside, run_id, runtime, stable_hash


@dataclasses.dataclass
class _Inner:
    lr: float = 0.1
    log_every: int = runtime(10)


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    seed: int = 0
    where: str = outside("/tmp")
    items: list = dataclasses.field(default_factory=lambda: [_Inner()])


def test_identity_dict_keeps_result_fields_only_recursively():
    assert identity_dict(_Outer()) == {"inner": {"lr": 0.1}, "seed": 0, "items": [{"lr": 0.1}]}
    assert identity_dict(_Outer(), drop=(OUTSIDE,)) == {"inner": {"lr": 0.1, "log_every": 10}, "seed": 0,
                                                        "items": [{"lr": 0.1, "log_every": 10}]}
    kinds = {f.name: field_kind(f) for f in dataclasses.fields(_Outer)}
    assert kinds == {"inner": RESULT, "seed": RESULT, "where": OUTSIDE, "items": RESULT}


def test_stable_hash_is_canonical_json_sha256():
    # sha256('{"a": 1, "b": [1, 2]}') computed by hand with hashlib
    import hashlib

    want = hashlib.sha256(b'{"a": 1, "b": [1, 2]}').hexdigest()
    assert stable_hash({"b": [1, 2], "a": 1}, 64) == want and stable_hash({"a": 1, "b": [1, 2]}, 8) == want[:8]


def _typed(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_typed(compose("config", overrides=overrides))


@pytest.mark.parametrize("change", [
    ["train.num_threads=1"], ["train.log_every=3"], ["train.save_every=7"], ["train.eval_batch_size=4"],
    ["train.cache_features=false"], ["train.cache_max_gb=1"], ["train.feature_batch_s=9"], ["train.resume=false"],
    ["data.max_skipped=0.5"], ["logger=tensorboard"], ["optimized_metric=storage_mb"], ["export=false"],
    ["cost.seconds=1"], ["cache_dir=/elsewhere"], ["command=cost"], ["model.trust_checkpoint=true"],
    ["data.mini.workers=1"],
])
def test_runtime_and_outside_settings_keep_the_run_id(change):
    assert run_id(_typed(change)) == run_id(_typed([]))


@pytest.mark.parametrize("change", [
    ["bits=2"], ["seed=1"], ["train.max_steps=10"], ["train.eval_every=5"], ["train.lr_schedule=constant"],
    ["task.lr=0.001"], ["quant.granularity=group", "bits=4"], ["data.mini.n_train=10"], ["model.init=random"],
    ["eval_data=real_speech"], ["train.amp=bf16"],
])
def test_result_settings_change_the_run_id(change):
    base = _typed(["bits=4"] if "bits=4" in change else [])
    assert run_id(_typed(change)) != run_id(base)


def test_resume_identity_leaves_out_schedule_and_runtime_fields():
    """Changing eval_every, or raising max_steps under a constant learning rate, keeps a head's resume key
    (training continues); under a decaying rate max_steps shapes every step's learning rate, so it stays."""
    from qspeech.train import TrainConfig

    const = TrainConfig(lr_schedule="constant")
    key = const.resume_identity()
    assert "max_steps" not in key and "eval_every" not in key and "log_every" not in key and key["lr_schedule"] == "constant"
    assert dataclasses.replace(const, eval_every=7, max_steps=9999, save_every=3).resume_identity() == key
    assert dataclasses.replace(const, batch_size=3).resume_identity() != key
    linear = TrainConfig(lr_schedule="linear")
    assert linear.resume_identity()["max_steps"] == linear.max_steps
    assert dataclasses.replace(linear, max_steps=9999).resume_identity() != linear.resume_identity()
    assert dataclasses.replace(linear, eval_every=7).resume_identity() == linear.resume_identity()
