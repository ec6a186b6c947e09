"""ASR downstream: vocabulary, CTC greedy decoding, WER, featurizer, head, configs, and an overfit test."""

from __future__ import annotations

import jiwer
import pytest
import torch
from omegaconf import OmegaConf

from qspeech.errors import ConfigError
from qspeech.checks import typed
from qspeech.train import TrainConfig
from qspeech.tasks.asr import ASRConfig, ASRHead, SpecAugment, SpecAugConfig
from qspeech.tasks.featurizer import Featurizer
from qspeech.tasks.ctc import greedy_collapse, greedy_decode
from qspeech.tasks.metrics import cer, wer
from qspeech.tasks.vocab import CharVocab

from test_asr_fixture import ROOT


def test_vocab_layout_and_roundtrip():
    v = CharVocab()
    assert len(v) == 29 and v.blank == 0 and v.symbols[1] == "|" and v.symbols[2] == "A" and v.symbols[-1] == "'"
    ids = v.encode("IT'S  A CAT")
    assert ids[0] == v.index["I"] and v.index["|"] in ids
    assert v.decode(ids) == "IT'S A CAT"
    assert v.decode([0, 1, 2, 1, 0]) == "A"  # boundaries at the ends vanish


def _onehot(seq, V=6):
    x = torch.full((len(seq), V), -5.0)
    for t, i in enumerate(seq):
        x[t, i] = 5.0
    return x


def test_ctc_greedy_decoding_is_exact():
    # repeats collapse, blanks (0) separate true repeats
    assert greedy_collapse([1, 1, 0, 1, 2, 2, 0, 0, 3]) == [1, 1, 2, 3]
    assert greedy_collapse([0, 0, 0]) == []
    assert greedy_collapse([4, 4, 4, 4]) == [4]
    assert greedy_collapse([2, 0, 2, 0, 2]) == [2, 2, 2]
    logits = torch.stack([_onehot([1, 1, 0, 1, 2, 2, 0, 3]), _onehot([5, 0, 5, 5, 0, 0, 0, 4])])
    assert greedy_decode(logits) == [[1, 1, 2, 3], [5, 5, 4]]
    # frames past the length are ignored
    assert greedy_decode(logits, torch.tensor([3, 4])) == [[1], [5, 5]]
    assert greedy_decode(_onehot([3, 0, 3])) == [[3, 3]]


def test_wer_and_cer_equal_jiwer():
    refs = ["THE CAT SAT", "ON THE MAT", "HELLO", "A B C D"]
    hyps = ["THE CAT SAT", "ON MAT", "HELO WORLD", ""]
    assert wer(refs, hyps) == pytest.approx(100 * jiwer.wer(refs, hyps))
    assert cer(refs, hyps) == pytest.approx(100 * jiwer.cer(refs, hyps))
    assert wer(refs, refs) == 0.0


def test_featurizer_uniform_init_and_weights_sum_to_one():
    f = Featurizer(7)
    w = f.layer_weights()
    assert len(w) == 7 and sum(w) == pytest.approx(1.0) and max(w) - min(w) < 1e-7
    hs = torch.randn(2, 5, 7, 4)
    assert torch.allclose(f(hs), hs.mean(dim=2), atol=1e-6)
    with torch.no_grad():
        f.weights.copy_(torch.randn(7))
    assert sum(f.layer_weights()) == pytest.approx(1.0)
    # s3prl's optional normalize: layer_norm without affine per hidden state
    g = Featurizer(7, normalize=True)
    ref = torch.nn.functional.layer_norm(hs, (4,)).mean(dim=2)
    assert torch.allclose(g(hs), ref, atol=1e-5)


def test_specaugment_only_in_training_and_keeps_padding_zero():
    sa = SpecAugment(SpecAugConfig(freq_mask_width=[0, 3], time_mask_width=[0, 4]))
    x = torch.randn(3, 30, 8)
    lens = torch.tensor([30, 20, 12])
    sa.eval()
    assert torch.equal(sa(x, lens), x)
    sa.train()
    torch.manual_seed(0)
    y = sa(x.clone(), lens)
    assert y.shape == x.shape and not torch.equal(y, x)
    assert y[1, 20:].abs().sum() == 0 and y[2, 12:].abs().sum() == 0


def test_head_shapes_and_superb_size():
    cfg = ASRConfig(project_dim=16, hidden_size=8)
    head = ASRHead(num_hidden=3, hidden_dim=12, vocab_size=29, cfg=cfg)
    out, lens = head(torch.randn(2, 10, 3, 12), torch.tensor([10, 6]))
    assert out.shape == (2, 10, 29) and lens.tolist() == [10, 6]
    head2 = ASRHead(3, 12, 29, ASRConfig(project_dim=16, hidden_size=8, frame_stride=2))
    out, lens = head2(torch.randn(2, 11, 3, 12), torch.tensor([11, 6]))
    assert out.shape == (2, 5, 29) and lens.tolist() == [5, 3]
    # the faithful head on a 768-d upstream (reference: 42.83 M with s3prl's 32-symbol dictionary)
    n = sum(p.numel() for p in ASRHead(13, 768, 29, _task("asr")).parameters())
    assert 42.80e6 < n < 42.84e6


def _task(name: str, **changes) -> ASRConfig:
    """conf/task/<name>.yaml (with `changes` merged in) as the typed, checked ASRConfig."""
    return typed(ASRConfig, OmegaConf.merge(OmegaConf.load(ROOT / f"conf/task/{name}.yaml"), changes), "task")


def _train(name: str, **changes) -> TrainConfig:
    return typed(TrainConfig, OmegaConf.merge(OmegaConf.load(ROOT / f"conf/train/{name}.yaml"), changes), "train")


def test_shipped_configs_validate():
    for t in ("asr", "asr_small"):
        c = _task(t)
        assert c.kind == "asr"
    sup = _train("superb")
    assert (sup.max_steps, sup.batch_size, sup.eval_every, sup.grad_clip) == (200000, 32, 2000, 1.0)
    assert _train("cpu").name == "cpu"
    asr = _task("asr")
    assert (asr.lr, asr.project_dim, asr.hidden_size, asr.num_layers, asr.dropout) == (1e-4, 1024, 1024, 2, 0.2)


@pytest.mark.parametrize("bad", [{"lr": 0}, {"num_layers": 0}, {"dropout": 1.5}, {"nope": 1}, {"kind": "sid"},
                                 {"specaug": {"freq_mask_width": [5, 1]}}])
def test_bad_task_config_raises(bad):
    with pytest.raises(ConfigError):
        _task("asr_small", **bad)


@pytest.mark.parametrize("bad", [{"max_steps": 0}, {"device": "tpu"}, {"cache_features": "maybe"},
                                 {"batch_size": 2.5}, {"bogus": True}])
def test_bad_train_config_raises(bad):
    with pytest.raises(ConfigError):
        _train("cpu", **bad)


def test_overfits_a_handful_of_utterances(tmp_path, monkeypatch):
    """The whole CTC path (cache -> featurizer -> BiLSTM -> CTC -> greedy decoding -> WER) learns:
    6 noise 'utterances' with a random tiny upstream are memorised to zero WER."""
    from qspeech.tasks import run_task
    from test_asr_fixture import use_corpus, make_cfg, tiny_upstream, write_corpus

    corpus = write_corpus(tmp_path / "wav", {"train": 6}, seconds=(0.8, 1.2))
    corpus["dev"] = corpus["test"] = corpus["train"]
    use_corpus(monkeypatch, corpus)
    cfg = make_cfg(tmp_path, **{"task.lr": 5e-3, "task.dropout": 0.0, "task.specaug.enabled": False,
                                "task.project_dim": 128, "task.hidden_size": 128, "task.num_layers": 1,
                                "train.max_steps": 200, "train.batch_size": 6, "train.eval_every": 20,
                                "train.lr_schedule": "constant", "train.num_threads": 1})
    m = run_task(cfg, tiny_upstream(), tmp_path / "run", "up0", progress=False).to_dict()
    assert m["value"] <= 5.0 and m["dev_wer"] <= 5.0 and m["cer"] <= 2.0
    assert m["n_train"] == 6 and m["feature_cache"] == "miss" and m["steps"] == 200
    assert len(m["layer_weights"]) == 7 and abs(sum(m["layer_weights"]) - 1) < 1e-4
    assert (tmp_path / "run" / "metrics.csv").exists() and (tmp_path / "run" / "test_predictions.tsv").exists()
    import json

    json.dumps(m)  # JSON-able


def test_run_without_cache_runs_upstream_and_skips_unreadable(tmp_path, monkeypatch, caplog):
    import logging

    from qspeech.tasks import run_task
    from test_asr_fixture import use_corpus, make_cfg, tiny_upstream, write_corpus

    corpus = write_corpus(tmp_path / "wav", {"train": 4, "dev": 2, "test": 2}, seconds=(0.4, 0.6))
    with open(corpus["train"][1].path, "wb") as f:
        f.write(b"garbage")
    use_corpus(monkeypatch, corpus)
    cfg = make_cfg(tmp_path, **{"train.cache_features": False, "train.max_steps": 3, "train.batch_size": 2,
                                "train.eval_every": 3, "task.project_dim": 16, "task.hidden_size": 16})
    with caplog.at_level(logging.WARNING, logger="qspeech.features"):
        m = run_task(cfg, tiny_upstream(), tmp_path / "run", "up0", progress=False).to_dict()
    assert m["feature_cache"] == "off" and m["steps"] == 3 and m["upstream_utts_per_s"] > 0
    assert m["skipped_audio"] == 1 and m["n_train"] == 3 and "train_1.wav" in caplog.text
    assert not (tmp_path / "cache" / "features").exists()


def test_bilstm_on_padded_batches_equals_packed_nn_lstm():
    """rnn.BiLSTM (padded input, backward direction on per-sequence reversed frames) computes what a
    bidirectional nn.LSTM computes on packed sequences: outputs and input gradients, padding zero."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from qspeech.tasks.rnn import BiLSTM, reverse_index

    assert reverse_index(torch.tensor([3, 1]), 4).tolist() == [[2, 1, 0, 3], [0, 1, 2, 3]]
    torch.manual_seed(0)
    ref = torch.nn.LSTM(5, 4, batch_first=True, bidirectional=True)
    ours = BiLSTM(5, 4)
    with torch.no_grad():
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ours.fwd, f"{n}_l0").copy_(getattr(ref, f"{n}_l0"))
            getattr(ours.bwd, f"{n}_l0").copy_(getattr(ref, f"{n}_l0_reverse"))
    lens = torch.tensor([7, 3, 5, 1])
    x = torch.randn(4, 7, 5)
    x[1, 3:] = 100.0  # padding must not leak into any valid output
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, _ = pad_packed_sequence(ref(pack_padded_sequence(xa, lens, batch_first=True, enforce_sorted=False))[0],
                                  batch_first=True, total_length=7)
    got = ours(xb, lens)
    assert torch.allclose(got, want, atol=1e-6)
    assert got[1, 3:].abs().max() == 0
    w = torch.randn_like(want)
    (want * w).sum().backward()
    (got * w).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)


def test_fused_bilstm_path_computes_the_two_pass_function_with_the_same_parameters():
    """The CUDA path (cuDNN's fused bidirectional kernel on packed sequences, float32 under autocast) run here
    on the CPU: the same outputs and gradients (inputs and every parameter) as the two-pass path, padding zero,
    and the same state_dict keys, so checkpoints move between the two."""
    from qspeech.tasks.rnn import BiLSTM

    torch.manual_seed(0)
    two, fused = BiLSTM(5, 4, fused=False), BiLSTM(5, 4, fused=True)
    fused.load_state_dict(two.state_dict())
    assert list(fused.state_dict()) == list(two.state_dict()) == [
        f"{d}.{n}_l0" for d in ("fwd", "bwd") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    lens = torch.tensor([6, 2, 4])
    x = torch.randn(3, 6, 5)
    x[1, 2:] = 50.0
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = two(xa, lens), fused(xb, lens)
    assert torch.allclose(a, b, atol=1e-6) and b[1, 2:].abs().max() == 0
    w = torch.randn_like(a)
    (a * w).sum().backward()
    (b * w).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)
    for p, q in zip(two.parameters(), fused.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the fused path leaves autocast: float32 out
        assert fused(x, lens).dtype == torch.float32
