"""qspeech.quantize_upstream: the layer-wise distillation loss and a QAT stage on the one training loop (its resumable state).
The end-to-end QAT checks (chain, cache, resume after a kill, beating RTN) are in test_quant.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qspeech.loop import STATE_VERSION, load_state
from qspeech.quantize_upstream import layer_distill_loss, prepare_quantized_upstream
from qspeech.quant import quant_config, clone_model


def test_layer_distill_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 5, 4, generator=g) for _ in range(2)]
    t = [torch.randn(2, 5, 4, generator=g) for _ in range(2)]
    lengths = torch.tensor([5, 3])
    valid = [(0, f) for f in range(5)] + [(1, f) for f in range(3)]

    def ref(per_frame):  # mean over layers of the mean over valid frames
        return sum(np.mean([float(per_frame(a[b, f], c[b, f])) for b, f in valid]) for a, c in zip(s, t)) / 2

    mse = ref(lambda a, c: (a - c).pow(2).mean())
    l1_cos = ref(lambda a, c: (a - c).abs().mean() - 0.5 * F.logsigmoid(F.cosine_similarity(a, c, dim=0)))
    assert float(layer_distill_loss(s, t, lengths, "mse")) == pytest.approx(mse, rel=1e-5)
    assert float(layer_distill_loss(s, t, lengths, "l1_cos", cos_weight=0.5)) == pytest.approx(l1_cos, rel=1e-5)


def test_stage_state_is_the_loops_and_belongs_to_its_config(tmp_path):
    import soundfile as sf

    from test_asr_fixture import tiny_upstream

    rng = np.random.default_rng(0)
    audio = []
    for i in range(3):
        sf.write(tmp_path / f"{i}.wav", (0.1 * rng.standard_normal(8000)).astype("float32"), 16000)
        audio.append(str(tmp_path / f"{i}.wav"))
    tiny = tiny_upstream()
    cfg = quant_config("lsq", steps=2, batch_size=1, max_seconds=0.3, ckpt_every=1)
    run = tmp_path / "run"
    prepare_quantized_upstream(clone_model(tiny), cfg, 4, audio, None, run, progress=False)
    state = load_state(run / "quant_ckpt" / "stage0_b4.pt")
    assert state["version"] == STATE_VERSION and state["step"] == 2 and state["stage"] == 0 and state["bits"] == 4
    assert len(state["losses"]) == 2 and all(np.isfinite(state["losses"]))
    # the same config resumes the finished stage (no step); another config's state is not resumed
    prepare_quantized_upstream(clone_model(tiny), cfg, 4, audio, None, run, progress=False)
    assert json.loads((run / "quant_distill.json").read_text())["stages"][0]["resumed_at"] == 2
    other = quant_config("lsq", steps=2, batch_size=1, max_seconds=0.3, ckpt_every=1, lr=1e-4)
    prepare_quantized_upstream(clone_model(tiny), other, 4, audio, None, run, progress=False)
    assert json.loads((run / "quant_distill.json").read_text())["stages"][0]["resumed_at"] == 0


def _noise_files(folder, n=3, samples=8000):
    import soundfile as sf

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        sf.write(folder / f"{i}.wav", (0.1 * rng.standard_normal(samples)).astype("float32"), 16000)
        out.append(str(folder / f"{i}.wav"))
    return out


def test_distillation_runs_on_the_placement_device_under_its_autocast(tmp_path):
    """Teacher, student and every batch on the run's device (CUDA when there is one: the same code path), the
    student's layers under the run's autocast, the loss in float32; the upstream handed in stays where it is."""
    from qspeech.quantize_upstream import Placement, run_placement
    from qspeech.train import TrainConfig

    from test_asr_fixture import tiny_upstream

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    placement = run_placement(TrainConfig(device=device.type, amp="bf16"))
    assert placement.device == device and isinstance(placement, Placement)
    seen = []
    tiny = tiny_upstream()
    cfg = quant_config("lsq", steps=2, batch_size=2, max_seconds=0.3)
    up = clone_model(tiny)

    def spy(module, args, out):
        seen.append((args[0].device, out.dtype))

    import qspeech.quantize_upstream as qu

    real = qu.DistillStage.__init__

    def init(self, student, *a, **k):
        real(self, student, *a, **k)
        student.model.encoder.layers[0].fc1.register_forward_hook(spy)
    qu.DistillStage.__init__ = init
    try:
        prepare_quantized_upstream(up, cfg, 4, _noise_files(tmp_path), None, tmp_path / "run", progress=False,
                                   placement=placement)
    finally:
        qu.DistillStage.__init__ = real
    assert seen and all(d.type == device.type and dt == torch.bfloat16 for d, dt in seen)
    assert next(up.parameters()).device.type == "cpu"
    losses = json.loads((tmp_path / "run" / "quant_distill.json").read_text())["stages"][0]
    assert np.isfinite(losses["loss_first"]) and np.isfinite(losses["loss_last"])


def test_unreadable_distillation_audio_is_skipped_deterministically(tmp_path):
    from qspeech.errors import DataError
    from qspeech.quantize_upstream import _AudioSampler

    good = _noise_files(tmp_path)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    paths = [good[0], str(bad), good[1], good[2]]
    a, b = _AudioSampler(paths, 4, 0.2, seed=3), _AudioSampler(paths, 4, 0.2, seed=3)
    for step in range(4):
        wa, la = a.batch(0, step)
        assert wa.shape[0] == 4
    assert list(a.skipped) == [str(bad)]
    wb, lb = b.batch(0, 3)  # a resumed run draws the same batch without having met the bad file before
    assert torch.equal(wa, wb) and torch.equal(la, lb)
    with pytest.raises(DataError, match="none of the 1 distillation audio files can be read"):
        _AudioSampler([str(bad)], 2, 0.2, seed=0).batch(0, 0)


def test_quant_audio_chooses_the_distillation_audio(monkeypatch):
    """quant_audio=... distils on another data set than the head's (the paper: LibriSpeech for every task)."""
    from hydra import compose, initialize_config_dir

    import qspeech.quantize_upstream as qu
    from qspeech.config import CONF_DIR, to_typed

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_typed(compose("config", overrides=["task=ks_small", "quant=bit", "bits=2", "quant_audio=mini",
                                                    "quant_audio.mini.n_train=7"]))
    asked = []
    monkeypatch.setattr(qu, "load_split", lambda data, split, cache: asked.append((data, split)) or [])
    monkeypatch.setattr(qu, "prepare_quantized_upstream", lambda up, q, bits, audio, *a, **k: audio)
    qu.quantize_upstream(cfg, None)
    assert asked == [(cfg.quant_audio, "train")] and cfg.quant_audio.mini.n_train == 7
    cfg_default = type(cfg)(**{**cfg.__dict__, "quant_audio": None})
    asked.clear()
    qu.quantize_upstream(cfg_default, None)
    assert asked == [(cfg.data, "train")]
