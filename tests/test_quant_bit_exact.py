"""quant=bit_exact against formulas transcribed from BiT's code (facebookresearch/bit transformer/utils_quant.py)
on hand-checkable tensors; LSQ's gradient-scale N (quant.grad_scale_n); new keys leave existing run keys alone."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import random_upstream
from qspeech.errors import ConfigError
from qspeech.quant import (
    quant_config,
    clone_model,
    get_method,
    overhead_values,
    quantize_,
    quantized_modules,
    quantized_weight_parts,
    validate_quant_config,
)
from qspeech.quant import functional as Fq
from qspeech.quant.methods.bit_exact import BwnWeight, act_chain
from qspeech.quant.methods.lsq import LSQWeight
from qspeech.quant.modules import ActQuantizer


@pytest.fixture(scope="module")
def tiny():
    return random_upstream("tiny_hubert")


# ------------------------------------------------------------------------------------- weights (BwnQuantizer)


def test_bwn_weights_one_mean_one_scale_per_tensor_identity_gradient():
    w = torch.tensor([[0.6, -1.4], [2.2, 0.2]], requires_grad=True)
    # BiT layerwise: e = mean W = 0.4, m = |W|_1 / n = 4.4 / 4 = 1.1, W_b = sign(W - e) * m
    q = BwnWeight(w.detach())(w)
    assert torch.allclose(q, torch.tensor([[1.1, -1.1], [1.1, -1.1]]), atol=1e-6, rtol=0)
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    (q * g).sum().backward()
    assert torch.equal(w.grad, g)  # BwnQuantizer.backward: grad_output unchanged (not x m, nothing via e or m)
    # qspeech's weight-only variant centres and scales each row: another result on the same tensor
    bit = get_method("bit").make_weight_quantizer(quant_config("bit"), w.detach(), 1)
    assert not torch.allclose(bit(w.detach()), q.detach())
    parts = BwnWeight(w.detach()).parts(w.detach())
    assert parts["format"] == "binary" and parts["codes"].tolist() == [[1, 0], [1, 0]]
    assert parts["scale"].shape == (1, 1) and parts["scale"].item() == pytest.approx(1.1)


# ------------------------------------------------------------------------------------- activations (elastic)

X = [-1.0, 0.2, 0.6, 3.0]  # with beta = 0.1 and alpha = 0.5: v = (x - beta) / alpha = [-2.2, 0.2, 1.0, 5.8]


def _elastic(bits, signed):
    x = torch.tensor(X, requires_grad=True)
    alpha = torch.tensor(0.5, requires_grad=True)
    y = Fq.bit_elastic(x - 0.1, alpha, bits, signed)
    y.sum().backward()
    return y.detach(), x.grad, alpha.grad.item()


def test_elastic_signed_one_bit_by_hand():
    y, gx, ga = _elastic(1, True)
    assert torch.allclose(y, torch.tensor([-0.5, 0.5, 0.5, 0.5]))
    assert torch.equal(gx, torch.tensor([0.0, 1.0, 1.0, 0.0]))  # Qn=-1 <= v <= Qp=1
    # BiT: sum(sign(x - beta) * g) / sqrt(numel * Qp) = (-1 + 1 + 1 + 1) / sqrt(4)
    assert ga == pytest.approx(1.0)
    # qspeech's bit (autograd through alpha*sign((x - beta)/alpha)): sum(sign(v) - v*1[|v|<=1]) = 2 - 1.2
    a = torch.tensor(0.5, requires_grad=True)
    Fq.elastic_quant(torch.tensor(X), a, torch.tensor(0.1), 1, True, g=1 / math.sqrt(4)).sum().backward()
    assert a.grad.item() == pytest.approx(0.8 / 2)


def test_elastic_signed_two_bits_by_hand():
    y, gx, ga = _elastic(2, True)  # Qn, Qp = -2, 1
    assert torch.allclose(y, torch.tensor([-1.0, 0.0, 0.5, 0.5]))  # clip(round(v)) * alpha
    assert torch.equal(gx, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    # small -> Qn, big -> Qp, middle -> round(v) - v: -2 + (0 - 0.2) + (1 - 1.0) + 1 = -1.2, / sqrt(4 * 1)
    assert ga == pytest.approx(-0.6, abs=1e-6)


def test_elastic_unsigned_by_hand():
    y, gx, ga = _elastic(1, False)  # Qn, Qp = 0, 1, no shift at 1 bit
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert torch.equal(gx, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert ga == pytest.approx((0 + (0 - 0.2) + 0 + 1) / math.sqrt(4))  # small -> Qn = 0
    # 2 bits: x' = x - beta - min(x - beta) = [0, 1.2, 1.6, 4.0]; v = [0, 2.4, 3.2, 8]; Qp = 3; + min back
    y, gx, ga = _elastic(2, False)
    assert torch.allclose(y, torch.tensor([0.0, 1.0, 1.5, 1.5]) - 1.1, atol=1e-6)
    assert torch.equal(gx, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert ga == pytest.approx((0 + (2 - 2.4) + 3 + 3) / math.sqrt(4 * 3), abs=1e-5)


def test_alpha_gradient_issue_check():
    """Issue 14's numbers: 1,000 N(0,1) samples (seed 0), alpha 0.7, beta 0.1, d(sum)/d alpha without the
    1/sqrt(numel * Qp) scale: BiT -78.0 (sum of sign(x - beta), recomputed here with numpy), qspeech's bit -60.0."""
    torch.manual_seed(0)
    x = torch.randn(1000)
    alpha = torch.tensor(0.7, requires_grad=True)
    Fq.bit_elastic(x - 0.1, alpha, 1, True).sum().backward()
    unscaled = alpha.grad.item() * math.sqrt(1000 * 1)
    assert unscaled == pytest.approx(float(np.sign(x.numpy() - 0.1).sum()), abs=1e-3)
    assert unscaled == pytest.approx(-78.0, abs=1e-3)
    ours = torch.tensor(0.7, requires_grad=True)
    Fq.elastic_quant(x, ours, torch.tensor(0.1), 1, True, g=1.0).sum().backward()
    assert ours.grad.item() == pytest.approx(-60.0, abs=1e-2)


def test_alpha_init_is_bits_alphainit():
    x = torch.tensor([-1.0, 2.0, -3.0, 4.0])  # mean |x| = 2.5
    assert Fq.bit_init_alpha(x, 1, True) == pytest.approx(5.0)  # 2 m / sqrt(1) (Qp = 0 -> 1)
    assert Fq.bit_init_alpha(x, 4, True) == pytest.approx(5.0 / math.sqrt(7))
    assert Fq.bit_init_alpha(x, 1, False) == pytest.approx(10.0)  # 4 m / sqrt(1)
    assert Fq.bit_init_alpha(x, 2, False) == pytest.approx(10.0 / math.sqrt(3))


def test_act_quantizer_per_channel_bias_and_first_batch_init():
    aq = ActQuantizer(1, elastic=True, channels=3, signed=True)
    x = torch.tensor([[[1.0, -2.0, 0.5], [-0.5, 1.5, -1.0]]])  # (B, T, C); mean |x| = 1.0833
    y = aq(x)
    assert aq.bit_exact and aq.beta.shape == (3,) and aq.alpha.item() == pytest.approx(2 * 6.5 / 6)
    assert torch.allclose(y, torch.sign(x) * aq.alpha.item())
    with torch.no_grad():
        aq.beta.copy_(torch.tensor([1.2, 0.0, 0.0]))
    x.requires_grad_()
    y = aq(x)
    assert y[0, 0, 0].item() < 0 and y[0, 0, 1].item() < 0  # 1.0 - 1.2 < 0 now: per-channel shift
    (y * torch.arange(1.0, 7.0).reshape(1, 2, 3)).sum().backward()
    # beta's gradient is minus the passed-through gradient summed over the frames (|x - beta| <= alpha)
    a = aq.alpha.item()
    passed = ((x.detach() - aq.beta.detach()).abs() <= a).float() * torch.arange(1.0, 7.0).reshape(1, 2, 3)
    assert torch.allclose(aq.beta.grad, -passed.sum((0, 1)))
    # conv inputs (B, C, T): one beta per channel along dim 1
    assert ActQuantizer(2, True, channels=4, channel_dim=-2).beta.shape == (4, 1)


def test_state_dict_rebuilds_the_exact_quantizer():
    aq = ActQuantizer(2, elastic=True, channels=3, signed=False)
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    aq(x)
    with torch.no_grad():
        aq.beta.copy_(torch.tensor([0.1, -0.2, 0.3]))
    fresh = ActQuantizer(2, elastic=True)  # what a packed file's loader builds
    fresh.load_state_dict(aq.state_dict())
    assert fresh.bit_exact and torch.equal(fresh(x), aq(x))


# ------------------------------------------------------------------------------------- the method


def test_bit_exact_facts_config_and_accounting():
    m = get_method("bit_exact")
    assert m.weight_bits == {1} and m.granularities == ("tensor",) and m.needs_distillation
    cfg = quant_config("bit_exact")
    assert (cfg.granularity, cfg.act_bits, cfg.distill_loss) == ("tensor", 1, "mse")
    with pytest.raises(ConfigError, match="bits=2 is not supported by quant.method=bit_exact"):
        validate_quant_config(cfg, 2)
    with pytest.raises(ConfigError, match="granularity=channel is not supported by bit_exact"):
        quant_config("bit_exact", granularity="channel")
    with pytest.raises(ConfigError, match="pos_conv"):
        quant_config("bit_exact", targets=["all"])
    quant_config("bit_exact", targets=["all"], act_bits=None)
    # one scale per tensor, + alpha and one beta per input channel
    assert overhead_values(cfg, (768, 3072), 1) == 1 + 1 + 3072
    assert overhead_values(quant_config("bit_exact", act_bits=None), (768, 3072), 1) == 1
    assert overhead_values(quant_config("bit_exact", targets=["cnn"]), (128, 64, 3), 1) == 1 + 1 + 64


def test_chain_steps_through_activation_bits():
    assert act_chain(1, True) == [4, 2, 1] and act_chain(2, True) == [4, 2] and act_chain(4, True) == [4]
    assert act_chain(8, True) == [8] and act_chain(3, True) == [4, 3] and act_chain(1, False) == [1]
    assert act_chain(None, True) == [None]
    plan = get_method("bit_exact").distill_plan(quant_config("bit_exact"), 1)
    assert [(b, c.act_bits) for b, c in plan] == [(1, 4), (1, 2), (1, 1)]
    assert [b for b, _ in get_method("bit").distill_plan(quant_config("bit", act_bits=1), 1)] == [2, 1]


def test_quantize_tiny_hubert_roles_and_parts(tiny):
    up = clone_model(tiny)
    quantize_(up, quant_config("bit_exact"), 1)
    mods = quantized_modules(up)
    assert len(mods) == 6 * 6  # q, k, v, out_proj, fc1, fc2 of 6 layers
    for name, mod in mods.items():
        aq = mod.input_quant
        assert aq.bit_exact and aq.beta.shape == (mod.weight.shape[1],)
        assert bool(aq.signed) == (not name.endswith("fc2"))  # BiT: sym_quant_ffn_attn=False, qkvo=True
    wav = torch.randn(1, 4000, generator=torch.Generator().manual_seed(2)) * 0.1
    with torch.no_grad():
        up(wav, torch.tensor([4000]))
    fc1 = mods["encoder.layers.0.fc1"]
    parts = quantized_weight_parts(fc1)
    w = fc1.parametrizations.weight.original
    assert parts["scale"].item() == pytest.approx(w.abs().mean().item(), rel=1e-6)
    assert parts["act"]["bit_exact"] and parts["act"]["beta"].shape == (256,)


def test_export_reload_is_identical(tiny, tmp_path):
    from qspeech.export import export_packed, load_packed
    from qspeech.quant.packing import is_storage_exact, round_to_storage_

    up = clone_model(tiny)
    qc = quant_config("bit_exact", act_bits=2)
    quantize_(up, qc, 1)
    wav = torch.randn(2, 3200, generator=torch.Generator().manual_seed(1)) * 0.1
    lens = torch.tensor([3200, 2400])
    with torch.no_grad():
        up(wav, lens)  # initialises the activation quantizers
        for m in quantized_modules(up).values():  # a trained, non-zero per-channel bias
            m.input_quant.beta.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    round_to_storage_(up)
    assert is_storage_exact(up)
    loaded = load_packed(export_packed(up, qc, 1, tmp_path / "up.safetensors", s3prl=False))
    with torch.no_grad():
        a, b = up(wav, lens).hidden_states, loaded(wav, lens).hidden_states
    assert all(float((x - y).abs().max()) == 0.0 for x, y in zip(a, b))


def test_distillation_chain_students_start_from_full_precision(tiny, monkeypatch, tmp_path):
    import soundfile as sf

    import qspeech.quantize_upstream as qat

    paths = []
    for i in range(2):
        p = tmp_path / f"a{i}.wav"
        sf.write(p, np.random.default_rng(i).standard_normal(8000).astype(np.float32) * 0.1, 16000)
        paths.append(str(p))
    seen = []
    real = qat._distill_stage

    def spy(student, teacher, sampler, cfg, stage, bits, key, ckpt, progress, label=None, placement=qat.Placement()):
        fc1 = dict(student.model.named_modules())["encoder.layers.0.fc1"]
        seen.append((cfg.act_bits, torch.equal(fc1.parametrizations.weight.original,
                                               dict(tiny.model.named_modules())["encoder.layers.0.fc1"].weight),
                     ckpt.name))
        return real(student, teacher, sampler, cfg, stage, bits, key, ckpt, progress, label, placement)

    monkeypatch.setattr(qat, "_distill_stage", spy)
    up = clone_model(tiny)
    cfg = quant_config("bit_exact", steps=1, batch_size=1, max_seconds=0.3)
    qat.prepare_quantized_upstream(up, cfg, 1, paths, cache_dir=None, run_dir=tmp_path / "run", progress=False)
    assert seen == [(4, True, "stage0_b1_a4.pt"), (2, True, "stage1_b1_a2.pt"), (1, True, "stage2_b1_a1.pt")]
    info = json.loads((tmp_path / "run" / "quant_distill.json").read_text())
    assert [s["act_bits"] for s in info["stages"]] == [4, 2, 1]
    assert all(m.input_quant.bits == 1 for m in quantized_modules(up).values())


# ------------------------------------------------------------------------------------- LSQ gradient scale


@pytest.mark.parametrize("how,n", [("row", 2), ("layer", 4)])
def test_lsq_grad_scale_n_by_hand(how, n):
    # per channel, 4 bits (Qn=-8, Qp=7): dq/ds summed per row, times g = 1/sqrt(N * 7)
    w = torch.tensor([[0.26, 9.0], [-0.74, 0.5]])
    q = LSQWeight(w, 4, "channel", grad_scale_n=how)
    with torch.no_grad():
        q.step.fill_(0.5)
    q(w).sum().backward()
    row0 = (round(0.52) - 0.52) + 7
    row1 = (round(-1.48) + 1.48) + (1 - 1.0)
    g = 1 / math.sqrt(n * 7)
    torch.testing.assert_close(q.step.grad[:, 0], torch.tensor([row0 * g, row1 * g]))
    assert q.g == pytest.approx(g)
    # the method builds it from the config (lsq and bit's 2-bit stage)
    for method in ("lsq", "bit"):
        cfg = quant_config(method, grad_scale_n=how)
        assert get_method(method).make_weight_quantizer(cfg, w, 2).g == pytest.approx(1 / math.sqrt(n * 1))


def test_grad_scale_n_config():
    assert quant_config("lsq").grad_scale_n == "row"
    with pytest.raises(ConfigError, match="grad_scale_n=col"):
        quant_config("lsq", grad_scale_n="col")
    with pytest.raises(ValueError):
        Fq.lsq_grad_scale_n(torch.ones(2, 2), torch.ones(2, 1, 2), "col")


# ------------------------------------------------------------------------------------- keys


def test_act_quantizer_channels_come_from_the_module():
    # make_act_quantizer reads the module's input channels from the weight (Linear) or in_channels (Conv1d)
    m = get_method("bit_exact")
    cfg = quant_config("bit_exact")
    assert m.make_act_quantizer(cfg, "x.fc2", nn.Linear(5, 3), 1).beta.shape == (5,)
    conv = m.make_act_quantizer(cfg, "feature_extractor.conv_layers.1.0", nn.Conv1d(4, 8, 3), 1)
    assert conv.beta.shape == (4, 1) and bool(conv.signed)
