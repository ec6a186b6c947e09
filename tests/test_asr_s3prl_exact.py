"""task=asr's s3prl-exact evaluation (issue 14, part 1): s3prl's dictionary, its frame lengths, its SpecAugment
width draws, and dev/test features computed one utterance at a time, checked on hand-worked inputs."""

from __future__ import annotations

import pytest
import torch

from qspeech.features import S3PRLLengths, frame_sources, s3prl_frame_lengths
from qspeech.tasks.asr import SpecAugConfig, SpecAugment
from qspeech.tasks.vocab import S3PRL_CHARS, S3PRLCharVocab, make_vocab

from test_asr_fixture import make_cfg, read_audio, tiny_upstream, write_corpus


def test_s3prl_dictionary_layout_encode_decode():
    v = S3PRLCharVocab()
    # fairseq Dictionary(): <s> <pad> </s> <unk> at 0..3, then char.dict in its order (| E T A O N ...)
    assert len(v) == 32 and v.symbols[:6] == ["<s>", "<pad>", "</s>", "<unk>", "|", "E"]
    assert v.blank == 0 and v.eos == 2 and len(S3PRL_CHARS) == 28
    ids = v.encode("it's  a cat")
    # "IT'S|A|CAT|" + </s>: s3prl's dataset appends '|' and encode_line appends </s>
    assert [v.symbols[i] for i in ids] == [*"IT'S|A|CAT|", "</s>"]
    assert v.decode(ids) == "IT'S A CAT"
    assert v.decode([0, v.index["A"], 0, 2]) == "A"  # <s> (the CTC blank) and </s> never reach the text
    assert v.decode([v.index["A"], 1, v.index["B"]]) == "A<pad>B"  # as s3prl's Dictionary.string keeps it
    assert type(make_vocab("s3prl")) is S3PRLCharVocab and len(make_vocab("qspeech")) == 29


def test_s3prl_frame_lengths_round_half_to_even_and_cap():
    lens = torch.tensor([480, 800, 1120, 3200])  # / 320 = 1.5, 2.5, 3.5, 10
    assert s3prl_frame_lengths(lens, 320, 10).tolist() == [2, 2, 4, 10]  # Python's round: half to even
    assert s3prl_frame_lengths(lens, 320, 3).tolist() == [2, 2, 3, 3]  # never more than the frames computed


@pytest.mark.parametrize("exclusive, expected", [(True, {0, 1}), (False, {0, 1, 2})])
def test_specaugment_width_draws(exclusive, expected):
    sa = SpecAugment(SpecAugConfig(max_width_exclusive=exclusive))
    torch.manual_seed(0)
    drawn = set(sa.draw_widths(2000, 2, [0, 2]).flatten().tolist())
    assert drawn == expected  # s3prl's randint(min, max) never draws max


def test_dev_test_features_are_each_utterance_alone(tmp_path):
    """With s3prl_exact, dev/test features are the upstream's on the utterance alone (no padding reaches the
    CNN's GroupNorm) and frame lengths are round(samples / 320); without it, a padded batch changes them."""
    corpus = write_corpus(tmp_path / "wav", {"train": 2, "dev": 3}, seconds=(0.5, 1.2))
    up = tiny_upstream().eval()
    fps = {"train": "t0", "dev": "d0"}
    results = {}
    for exact in (True, False):
        cfg = make_cfg(tmp_path / str(exact), **{"train.cache_features": True, "train.feature_batch_s": 100.0})
        sources = frame_sources(up, "up0", corpus, fps, read_audio, tmp_path / str(exact) / "cache", cfg.train,
                                torch.device("cpu"), progress=False, s3prl_exact=exact)
        results[exact] = sources["dev"]
    for exact, src in results.items():
        for i, u in enumerate(src.utts):
            wav = torch.from_numpy(read_audio(u.path))[None]
            with torch.no_grad():
                alone = torch.stack(up(wav, torch.tensor([wav.shape[1]])).hidden_states, dim=2)[0]
            feats, lens, _ = src.batch([i], "cpu")
            n = int(lens[0])
            if exact:
                assert n == min(round(wav.shape[1] / 320), alone.shape[0])
                # the cache stores fp16: the lone forward, rounded as the cache rounds it
                assert torch.equal(feats[0, :n], alone[:n].half().float())
            else:
                diff = (feats[0, :n] - alone[:n].half().float()).abs().max()
                if u.duration_s < max(v.duration_s for v in src.utts):  # padded in its batch
                    assert diff > 1e-3


def test_s3prl_lengths_wrapper_keeps_the_upstream():
    up = tiny_upstream().eval()
    wrapped = S3PRLLengths(up)
    assert wrapped.num_hidden == up.num_hidden and wrapped.downsample_rate == 320
    wavs = torch.randn(2, 16000)
    lens = torch.tensor([16000, 8160])  # 8160 / 320 = 25.5 -> 26 (half to even); the CNN gives 25
    with torch.no_grad():
        out, ref = wrapped(wavs, lens), up(wavs, lens)
    frames = ref.hidden_states[0].shape[1]
    assert frames == 49 and ref.lengths.tolist() == [49, 25]  # the CNN's own lengths
    assert out.lengths.tolist() == [49, 26]  # round(16000 / 320) = 50, capped at the 49 computed
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states))
