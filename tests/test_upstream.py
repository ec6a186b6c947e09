"""Upstream loading: s3prl formats, hidden states identical to s3prl's own model, safe loading, errors."""


import pytest
import torch

from conftest import model_cfg, random_upstream
from qspeech.errors import CheckpointError
from qspeech.upstream import build_upstream, save_checkpoint
from qspeech.upstream.checkpoints import s3prl_cache_path


def _s3prl_reference_states(model, wavs, pad):
    """What s3prl's hubert UpstreamExpert returns: layer inputs (hooked) + encoder output."""
    states = []
    hooks = [l.register_forward_pre_hook(lambda m, a: states.append(a[0].transpose(0, 1))) for l in model.encoder.layers]
    hooks.append(model.encoder.register_forward_hook(lambda m, a, o: states.append(o[0])))
    model.extract_features(wavs, padding_mask=pad, mask=False)
    for h in hooks:
        h.remove()
    unpad_len = min(h.size(1) for h in states)  # s3prl's hook_postprocess
    return [h[:, :unpad_len, :] for h in states]


@pytest.mark.parametrize("name", ["tiny_hubert", "tiny_distilhubert"])
def test_converted_checkpoint_roundtrip_gives_identical_hidden_states(tmp_path, name):
    up = random_upstream(name)
    path = save_checkpoint(up, tmp_path / "model.ckpt")
    loaded = build_upstream(model_cfg(name, ckpt=str(path)))
    wavs = torch.randn(2, 8000)
    lens = torch.tensor([8000, 6000])
    with torch.no_grad():
        a, b = up(wavs, lens), loaded(wavs, lens)
    assert len(a.hidden_states) == up.num_hidden == (7 if name == "tiny_hubert" else 6)
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert torch.equal(x, y)
    assert a.lengths.tolist() == [24, 18]


def test_hidden_states_match_s3prl_model_directly(tmp_path):
    """A checkpoint written in s3prl's converted format from a randomly initialised s3prl HubertModel."""
    from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig

    torch.manual_seed(0)
    arch = dict(model_cfg("tiny_hubert").arch_cfg)
    model = HubertModel(HubertConfig(label_rate=50.0, **arch), HubertPretrainingConfig(label_rate=50.0), [list(range(20))])
    model.eval()
    state = {"task_cfg": {"label_rate": 50.0, "normalize": False}, "model_cfg": {"label_rate": 50.0, **arch},
             "model_weight": model.state_dict(), "dictionaries_symbols": [list(range(20))]}
    torch.save(state, tmp_path / "hubert.pt")
    up = build_upstream(model_cfg("tiny_hubert", ckpt=str(tmp_path / "hubert.pt")))
    wavs = torch.randn(1, 16000)
    with torch.no_grad():
        ours = up(wavs, torch.tensor([16000])).hidden_states
        ref = _s3prl_reference_states(model, wavs, torch.zeros(1, 16000, dtype=torch.bool))
    assert len(ours) == len(ref) == 7
    for x, y in zip(ours, ref):
        assert torch.equal(x, y)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable checkpoint.*corrupt, truncated"):
        build_upstream(model_cfg("tiny_hubert", ckpt=str(bad)))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(random_upstream(), tmp_path / "m.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        build_upstream(model_cfg("tiny_hubert", ckpt=str(path)))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused_by_default(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"task_cfg": {}, "model_cfg": {}, "model_weight": {}, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="trust_checkpoint=true"):
        build_upstream(model_cfg("tiny_hubert", ckpt=str(path)))


def test_wrong_format_names_what_it_found(tmp_path):
    up = random_upstream("tiny_distilhubert")
    path = save_checkpoint(up, tmp_path / "distil.ckpt")
    with pytest.raises(CheckpointError, match="looks like a 'distiller' checkpoint"):
        build_upstream(model_cfg("tiny_hubert", ckpt=str(path)))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        build_upstream(model_cfg("hubert", ckpt=str(tmp_path / "nope.pt")))


def test_offline_download_error_names_url_cache_and_option(monkeypatch):
    cfg = model_cfg("hubert", url="http://127.0.0.1:9/hubert_base_ls960.pt")
    with pytest.raises(CheckpointError) as e:
        build_upstream(cfg)
    msg = str(e.value)
    assert "http://127.0.0.1:9/hubert_base_ls960.pt" in msg
    assert str(s3prl_cache_path(cfg.url)) in msg
    assert "model.ckpt=" in msg and "\n" not in msg


def test_cached_download_is_used_without_network(tmp_path):
    up = random_upstream()
    url = "http://127.0.0.1:9/tiny.pt"
    save_checkpoint(up, s3prl_cache_path(url))
    loaded = build_upstream(model_cfg("tiny_hubert", url=url, asset=None))
    assert loaded.spec.source == str(s3prl_cache_path(url))


def test_no_torchaudio_import():
    import sys

    import qspeech.cli, qspeech.cost, qspeech.upstream  # noqa: E401,F401

    assert "torchaudio" not in sys.modules


def test_fbank_upstream_matches_the_kaldi_mfcc_and_the_cnn_frames():
    # FBANK's log-mel energies, through the DCT and lifter, are the (separately written) Kaldi-style MFCCs;
    # it has as many frames as tiny_hubert's CNN, so the same downstream head applies.
    import numpy as np

    from qspeech.pretrain.mfcc import _dct, mfcc
    from qspeech.upstream.fbank import Fbank

    wav = (np.random.default_rng(0).standard_normal(16000 * 2) * 0.1).astype(np.float32)
    fb = Fbank(n_mels=23, cmvn=False)(torch.from_numpy(wav)[None], torch.tensor([len(wav)]))[0].double().numpy()
    ceps = fb @ _dct(23, 13)
    ceps = ceps * (1.0 + 0.5 * 22.0 * np.sin(np.pi * np.arange(13) / 22.0))
    ref = mfcc(wav, n_deltas=0, cmn=False)
    np.testing.assert_allclose(ceps, ref, rtol=1e-4, atol=1e-3)

    fbank = build_upstream(model_cfg("fbank"))
    tiny = random_upstream()
    wavs, lens = torch.randn(2, 20000) * 0.1, torch.tensor([20000, 13333])
    out, ref_out = fbank(wavs, lens), tiny(wavs, lens)
    assert torch.equal(out.lengths, ref_out.lengths)
    assert out.hidden_states[0].shape[:2] == ref_out.hidden_states[0].shape[:2]
    # per-utterance CMVN over the valid frames only; padding stays zero
    h = out.hidden_states[0][1, : out.lengths[1]]
    assert h.mean(0).abs().max() < 1e-4 and (h.std(0, unbiased=False) - 1).abs().max() < 1e-3
    assert out.hidden_states[0][1, out.lengths[1]:].abs().max() == 0
    assert sum(p.numel() for p in fbank.parameters()) == 0
