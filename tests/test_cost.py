"""Cost accounting: exact parameter counts, the storage / runtime conventions, MACs from real modules."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import random_upstream
from qspeech.cost import account, count_macs
from qspeech.quant.targets import select_targets

NO_SCALES = lambda shape, bits: 0  # noqa: E731
PER_CHANNEL = lambda shape, bits: shape[0]  # noqa: E731


@pytest.fixture(scope="module")
def hubert():
    return random_upstream("hubert")


@pytest.fixture(scope="module")
def distil():
    return random_upstream("distilhubert")


def test_hubert_base_params_and_full_precision_storage(hubert):
    r = account(hubert, {}, NO_SCALES, seconds=1.0)
    assert r.params == 94_371_712
    assert r.quantized_params == 0
    assert r.storage_mb == pytest.approx(94_371_712 * 16 / 8 / 1e6)  # 188.74 MB
    assert r.est_runtime == 1.0


def test_distilhubert_params_match_paper_storage(distil):
    r = account(distil, {}, NO_SCALES, seconds=1.0)
    assert r.params == 23_491_200
    assert round(r.storage_mb, 2) == 46.98


@pytest.mark.parametrize("bits", [1, 2])
def test_low_bit_storage_formula(hubert, bits):
    chosen = select_targets(hubert.model, bits, ["linear"])
    assert len(chosen) == 72  # the transformer linears of HuBERT Base
    r = account(hubert, chosen, PER_CHANNEL, seconds=1.0)
    q = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    scales = 12 * (4 * 768 + 3072 + 768)  # one per output channel
    assert r.quantized_params == q == 84_934_656
    expected = (q * bits + scales * 16 + (94_371_712 - q) * 16) / 8 / 1e6
    assert r.storage_mb == pytest.approx(expected)


def test_runtime_is_mac_weighted_bits(hubert):
    macs = count_macs(hubert, 2.0)
    chosen = select_targets(hubert.model, 2, ["linear", "cnn"])
    r = account(hubert, chosen, NO_SCALES, seconds=2.0)
    total = sum(m for _, m in macs.values())
    q = sum(m for name, (_, m) in macs.items() if name in chosen)
    assert r.est_runtime == pytest.approx(((total - q) + q * 2 / 32) / total)
    assert r.macs == total


@pytest.mark.parametrize("which", ["hubert", "distil"])
def test_macs_equal_flop_counter(hubert, distil, which):
    """Per-module MACs (hooks, plus projections that attention runs without calling the module) sum to
    torch's FlopCounterMode count of the same forward pass. The counter does not see the fused attention
    matmuls, which we count as 2 x T^2 x E per layer."""
    up = hubert if which == "hubert" else distil
    n = 16320  # 50 frames: HuBERT pads its layers to an even length, so T is what attention really sees
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        out = up(torch.zeros(1, n), torch.tensor([n]))
    macs = count_macs(up, n / 16000)
    weights = sum(m for k, m in macs.values() if k != "attention")
    assert weights == fc.get_total_flops() // 2
    T, E = out.hidden_states[0].shape[1], up.hidden_size
    attention = [m for k, m in macs.values() if k == "attention"]
    layers = 12 if which == "hubert" else 2
    assert attention == [2 * T * T * E] * layers


def test_cnn_share_of_macs_matches_reference(hubert):
    """reference.md: for 10 s of audio the CNN is ~33 % of HuBERT Base's MACs and the 72 linears ~57 %."""
    macs = count_macs(hubert, 10.0)
    total = sum(m for _, m in macs.values())
    share = lambda kind: sum(m for k, m in macs.values() if k == kind) / total  # noqa: E731
    assert share("cnn") == pytest.approx(0.33, abs=0.01)
    assert share("linear") == pytest.approx(0.57, abs=0.01)


def test_targets_selection_exclude_and_overrides(hubert):
    m = hubert.model
    assert select_targets(m, 32, ["linear"]) == {}
    cnn = select_targets(m, 4, ["cnn"])
    assert len(cnn) == 7 and set(cnn.values()) == {4}
    mixed = select_targets(m, 2, ["linear"], exclude=["encoder.layers.0.*"], overrides={"encoder.layers.11.fc*": 8})
    assert len(mixed) == 72 - 6
    assert mixed["encoder.layers.11.fc1"] == 8 and mixed["encoder.layers.5.fc1"] == 2
    assert all(not k.startswith("final_proj") for k in select_targets(m, 2, ["all"]))


def test_displayed_bits_are_the_counted_bits_and_the_summary_sums_to_the_totals(hubert):
    """`qspeech cost` shows each weight at the bits storage counts it at (16 when not quantized, never 32),
    and its summary by part adds up to the report's totals."""
    from qspeech.cost import format_table, summary_by_group

    chosen = select_targets(hubert.model, 2, ["linear"])
    r = account(hubert, chosen, PER_CHANNEL, seconds=1.0)
    modules = dict(hubert.model.named_modules())
    for row in r.rows:
        if not row.params:
            assert row.stored_bits is None and row.storage_bits == 0
        elif row.quantized:
            w = modules[row.name].weight.numel()
            assert row.stored_bits == 2
            assert row.storage_bits == w * 2 + (row.params - w) * 16 + row.scale_values * 16
        else:
            assert row.stored_bits == 16 and row.storage_bits == row.params * 16
    summary = {s["group"]: s for s in summary_by_group(r)}
    assert sum(s["params"] for s in summary.values()) == r.params == 94_371_712
    assert sum(s["macs"] for s in summary.values()) == r.macs
    assert sum(s["bytes"] for s in summary.values()) == pytest.approx(r.storage_mb * 1e6)
    assert summary["attention linears"]["params"] == 12 * 4 * (768 * 768 + 768)
    assert summary["FFN"]["params"] == 12 * 2 * 768 * 3072 + 12 * (3072 + 768)
    assert (summary["attention linears"]["bits"], summary["FFN"]["bits"], summary["CNN"]["bits"]) == ("2", "2", "16")
    assert (summary["pos_conv"]["bits"], summary["norms"]["bits"], summary["attention matmuls"]["bits"]) == (
        "16", "16", "-")
    assert summary["CNN"]["modules"] == 7 and summary["attention matmuls"]["params"] == 0
    text = format_table(r)
    assert "By part of the model" in text and "| 32 " not in text
