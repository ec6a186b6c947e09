import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Never touch the user's caches from tests; the corpus cache is shared by the session's tests.
    cache = tmp_path_factory.getbasetemp() / "qspeech-cache"
    monkeypatch.setenv("QSPEECH_CACHE", str(cache))
    monkeypatch.setenv("S3PRL_DOWNLOAD_DIR", str(tmp_path_factory.getbasetemp() / "s3prl-cache"))
    torch.set_num_threads(2)


def model_cfg(name: str, **overrides):
    """conf/model/<name>.yaml as the typed ModelConfig, with `overrides` replacing fields."""
    from qspeech.checks import typed
    from qspeech.upstream.config import ModelConfig

    cfg = typed(ModelConfig, OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"), "model")
    return dataclasses.replace(cfg, **overrides)


def random_upstream(name: str = "tiny_hubert", seed: int = 0):
    from qspeech.upstream import build_upstream

    torch.manual_seed(seed)
    return build_upstream(model_cfg(name, init="random"))


def run_cli(*args, cwd=None, env=None, timeout=600):
    """The real console script, in a subprocess (Hydra owns sys.argv and global state)."""
    full_env = {**os.environ, **(env or {})}
    exe = Path(sys.executable).parent / "qspeech"
    return subprocess.run([str(exe), *args], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
