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
