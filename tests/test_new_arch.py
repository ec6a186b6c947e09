"""A new upstream architecture is one module in qspeech/upstream/archs/ plus conf/model/<name>.yaml: a throwaway
one (tests/new_arch) goes through config composition, build_upstream, checkpoints, hidden states, the cost
accounting, quantization and the packed export round trip with nothing else changed."""

import dataclasses
import importlib
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import qspeech.upstream.archs
from qspeech.config import CONF_DIR, to_typed
from qspeech.cost import account_quantized
from qspeech.errors import CheckpointError, ConfigError
from qspeech.export import export_packed, load_packed, s3prl_path
from qspeech.quant import quant_config, quantize_, quantized_modules, round_to_storage_
from qspeech.upstream import ModelConfig, build_upstream, save_checkpoint
from qspeech.upstream.registry import arch_names, checkpoint_formats, unregister

NEW = Path(__file__).resolve().parent / "new_arch"
MODULE = "qspeech.upstream.archs.toy"


@pytest.fixture
def toy_cfg():
    """Registers tests/new_arch/archs/toy.py as a module of qspeech.upstream.archs, composes model=toy from
    tests/new_arch/conf (hydra.searchpath), and takes the architecture away again afterwards."""
    qspeech.upstream.archs.__path__.append(str(NEW / "archs"))
    try:
        importlib.import_module(MODULE)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"hydra.searchpath=[file://{NEW / 'conf'}]", "model=toy"])
        yield to_typed(cfg).model
    finally:
        unregister("toy")
        sys.modules.pop(MODULE, None)
        qspeech.upstream.archs.__path__.remove(str(NEW / "archs"))


def _states(upstream, wavs, lens):
    with torch.inference_mode():
        out = upstream(wavs, lens)
    return out.hidden_states, out.lengths


def test_a_new_architecture_needs_one_module_and_one_yaml(toy_cfg, tmp_path):
    assert toy_cfg.arch == "toy" and "toy" in arch_names() and "toy" in checkpoint_formats()
    torch.manual_seed(0)
    up = build_upstream(toy_cfg)
    assert up.spec.source == "random" and up.num_hidden == 3 and up.hidden_size == 32 and up.downsample_rate == 320
    wavs, lens = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 9600])
    states, lengths = _states(up, wavs, lens)
    assert len(states) == 3 and states[0].shape[-1] == 32 and lengths.tolist() == [50, 30]

    # its checkpoint format: written, checked, loaded back through model.ckpt=
    ckpt = save_checkpoint(up, tmp_path / "toy.pt")
    loaded = build_upstream(dataclasses.replace(toy_cfg, ckpt=str(ckpt), init="pretrained"))
    assert all(torch.equal(a, b) for a, b in zip(states, _states(loaded, wavs, lens)[0]))
    hubert = dataclasses.replace(toy_cfg, arch="hubert", ckpt=str(ckpt), init="pretrained")
    with pytest.raises(CheckpointError, match="looks like a 'toy' checkpoint"):
        build_upstream(hubert)

    # cost accounting and quantization see its linears and convolutions
    qc = quant_config("rtn", targets=["linear", "cnn"])
    full = account_quantized(up, quant_config("rtn"), 32, 1.0)
    cost = account_quantized(up, qc, 4, 1.0)
    assert cost.params == full.params == sum(p.numel() for p in up.parameters())
    assert cost.macs > 0 and cost.storage_mb < full.storage_mb
    quantize_(up, qc, 4)
    round_to_storage_(up)
    assert sorted(quantized_modules(up)) == ["encoder.layers.0.fc1", "encoder.layers.0.fc2", "encoder.layers.1.fc1",
                                             "encoder.layers.1.fc2", "feature_extractor.0", "feature_extractor.2"]
    quantized, _ = _states(up, wavs, lens)
    assert not torch.equal(quantized[-1], states[-1])

    # the packed file and the checkpoint copy beside it reload to the quantized model exactly
    up.requires_grad_(False)
    packed = export_packed(up, qc, 4, tmp_path / "upstream.packed.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(quantized, _states(load_packed(packed), wavs, lens)[0]))
    copy = build_upstream(dataclasses.replace(toy_cfg, ckpt=str(s3prl_path(packed)), init="pretrained"))
    assert all(torch.equal(a, b) for a, b in zip(quantized, _states(copy, wavs, lens)[0]))


def test_the_arch_choices_come_from_the_registry(toy_cfg):
    ModelConfig(name="toy", arch="toy", url=None, init="random")
    unregister("toy")
    with pytest.raises(ConfigError, match="arch=toy.*choose one of hubert, wav2vec2, distiller, wavlm, fbank"):
        ModelConfig(name="toy", arch="toy", url=None, init="random")
