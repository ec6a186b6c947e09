"""qspeech.pretrain: MFCC framing, HuBERT masked prediction, DistilHuBERT distillation, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from qspeech.errors import CheckpointError, ConfigError
from qspeech.pretrain import common, compose, distilhubert, hubert
from qspeech.pretrain.mfcc import conv_layers, mfcc, num_frames, receptive_field
from qspeech.pretrain.labels import assign, fit_kmeans
from qspeech.upstream import ModelConfig, Upstream, UpstreamSpec, build_upstream

SR = 16_000
CNN = "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"  # HuBERT's strides, narrow channels
TINY = {"conv_feature_layers": CNN, "encoder_layers": 2, "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 128,
        "encoder_attention_heads": 2, "conv_pos": 16, "conv_pos_groups": 4, "final_dim": 32}
TRAIN = {"mask_prob": 0.65, "mask_length": 5, "feature_grad_mult": 0.1, "dropout": 0.0, "attention_dropout": 0.0,
         "dropout_input": 0.0, "dropout_features": 0.0, "encoder_layerdrop": 0.0, "skip_nomask": True}
STUDENT = {"extractor_conv_feature_layers": CNN, "encoder_layers": 1, "encoder_embed_dim": 64,
           "encoder_ffn_embed_dim": 128, "encoder_attention_heads": 2, "conv_pos": 16, "conv_pos_groups": 4,
           "final_dim": 64, "n_tasks": 2, "pred_layer_id": [1, 2], "out_layer_type": "expand-last",
           "task_emb_type": "expand-last", "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
           "feature_grad_mult": 0.1, "cosine_loss": 1.0, "loss_type": "l1",
           "init_teacher_conv_layers": True, "init_teacher_encoder_layers": True}
OPTIM = OmegaConf.create({"lr": 2e-3, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.0, "warmup": 3,
                          "grad_clip": 10.0})


def synthetic_clip(seed: int, seconds: float = 1.0) -> np.ndarray:
    """Segments of 60-200 ms, each a harmonic tone with its own pitch and spectral tilt: frames whose MFCCs
    fall into a few clear clusters."""
    rng = np.random.default_rng(seed)
    out, n = [], int(seconds * SR)
    while sum(map(len, out)) < n:
        m = int(rng.uniform(0.06, 0.2) * SR)
        t = np.arange(m) / SR
        f0, tilt = rng.choice([110.0, 180.0, 260.0]), rng.choice([0.3, 0.7, 1.5])
        seg = sum(np.sin(2 * np.pi * f0 * h * t) / h**tilt for h in range(1, 12))
        out.append(0.1 * seg / np.abs(seg).max() + 0.002 * rng.standard_normal(m))
    return np.concatenate(out)[:n].astype(np.float32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and much faster on a shared, loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clips():
    return [synthetic_clip(i, 1.0 + 0.1 * i) for i in range(6)]


def _upstream(model, arch, arch_cfg):
    return Upstream(model, UpstreamSpec("tiny", arch, arch_cfg))


# ---------------------------------------------------------------------------------------------- MFCC
@pytest.mark.parametrize("n", [400, 719, 720, 1000, 16_000, 16_321, 23_456])
def test_mfcc_frames_match_the_cnn(n):
    layers = conv_layers(CNN)
    assert receptive_field(layers) == (400, 320)  # 25 ms window, 20 ms hop
    wav = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    feats = mfcc(wav)
    model = hubert.build_model(hubert.model_config(TINY, TRAIN, 320), 8, 320).eval()
    with torch.no_grad():
        cnn = model.feature_extractor(torch.from_numpy(wav)[None])
    up = _upstream(model, "hubert", TINY)
    assert feats.shape == (cnn.shape[2], 39) == (num_frames(n, layers), 39)
    assert int(up.frame_lengths(torch.tensor([n]))[0]) == feats.shape[0] == (n - 400) // 320 + 1
    assert np.isfinite(feats).all()


def test_mfcc_short_and_cmn():
    assert mfcc(np.zeros(399, np.float32)).shape == (0, 39)
    f = mfcc(synthetic_clip(0), cmn=True)
    assert np.allclose(f[:, :13].mean(0), 0, atol=1e-4)
    assert mfcc(synthetic_clip(0), n_deltas=0).shape[1] == 13


def test_parse_conv_layers_like_s3prl():
    spec = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"
    assert conv_layers(spec) == eval(spec)  # noqa: S307 - a constant


# ---------------------------------------------------------------------------------- masked prediction
def _labels(clips, k=8):
    feats = [mfcc(c) for c in clips]
    km = fit_kmeans(feats, k, OmegaConf.create({"max_frames": 10_000, "batch_size": 1024, "n_init": 1,
                                               "max_iter": 50, "standardize": True}), seed=0)
    return assign(feats, km)


def _hubert_step_fn(model, clips, labels, length=SR):
    n = num_frames(length, conv_layers(CNN))
    wavs = torch.from_numpy(np.stack([c[:length] for c in clips]))
    tg = torch.from_numpy(np.stack([lab[:n] for lab in labels]).astype(np.int64))
    return lambda step: hubert.masked_prediction_loss(model, wavs, tg, 10.0)


def test_masked_prediction_loss_decreases(tmp_path, clips):
    torch.manual_seed(0)
    labels = _labels(clips)
    model = hubert.build_model(hubert.model_config(TINY, TRAIN, 320), 8, 320)
    log = common.LossLog(tmp_path / "loss.csv", ["stage", "step", "global_step", "lr", "wall_s", "loss", "ce_m",
                                                 "acc_m", "feat_pen", "masked_frac", "grad_norm"])
    res = common.train_loop("it1", model, _hubert_step_fn(model, clips, labels), 20, OPTIM, tmp_path / "state.pt",
                            log, log_every=2, ckpt_every=10, progress=False)
    ce = [float(r["ce_m"]) for r in log.rows()]
    assert len(ce) == 10 and ce[-1] < ce[0] - 0.2 and ce[-1] < np.log(8) - 0.25, ce
    assert res["last"]["ce_m"] == pytest.approx(ce[-1], rel=1e-3)
    assert (tmp_path / "state.pt").exists()


def test_unmasked_loss_term_and_label_init(clips):
    labels = _labels(clips)
    torch.manual_seed(0)
    model = hubert.build_model(hubert.model_config(TINY, {**TRAIN, "skip_nomask": False}, 320), 8, 320)
    hubert.init_label_embeddings(model, "normal")
    assert float(model.label_embs_concat.min()) < 0  # N(0, 1), not fairseq's U(0, 1)
    n = num_frames(SR, conv_layers(CNN))
    wavs = torch.from_numpy(np.stack([c[:SR] for c in clips]))
    tg = torch.from_numpy(np.stack([lab[:n] for lab in labels]).astype(np.int64))
    torch.manual_seed(1), np.random.seed(1)
    only_m, m1 = hubert.masked_prediction_loss(model, wavs, tg, 0.0, 1.0, 0.0)
    torch.manual_seed(1), np.random.seed(1)
    both, m2 = hubert.masked_prediction_loss(model, wavs, tg, 0.0, 1.0, 0.5)
    assert "ce_u" not in m1 and {"ce_u", "acc_u"} <= set(m2)
    assert float(both) == pytest.approx(float(only_m) + 0.5 * m2["ce_u"], rel=1e-5)


def test_training_resumes_exactly(tmp_path, clips):
    labels = _labels(clips)

    def run(folder, stop):
        torch.manual_seed(0)
        model = hubert.build_model(hubert.model_config(TINY, {**TRAIN, "dropout": 0.1}, 320), 8, 320)
        log = common.LossLog(folder / "loss.csv", ["stage", "step", "global_step", "loss"])
        fn = _hubert_step_fn(model, clips, labels)
        if stop:  # interrupted after `stop` steps: same schedule, state saved at `stop`
            common.train_loop("it1", model, fn, 8, OPTIM, folder / "state.pt", log, 2, stop, progress=False,
                              _stop_after=stop)
            torch.manual_seed(123)  # a fresh process
            model = hubert.build_model(hubert.model_config(TINY, {**TRAIN, "dropout": 0.1}, 320), 8, 320)
            fn = _hubert_step_fn(model, clips, labels)
        common.train_loop("it1", model, fn, 8, OPTIM, folder / "state.pt", log, 2, 4, progress=False)
        return model, [r["loss"] for r in log.rows()]

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    ma, la = run(tmp_path / "a", 0)
    mb, lb = run(tmp_path / "b", 4)
    assert la == lb
    for (k, a), b in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(a, b), k


# -------------------------------------------------------------------------------------- distillation
def test_distillation_loss_decreases(tmp_path, clips):
    torch.manual_seed(0)
    teacher_model = hubert.build_model(hubert.model_config(TINY, TRAIN, 320), 8, 320)
    teacher = _upstream(teacher_model, "hubert", TINY).requires_grad_(False)
    student = distilhubert.build_student(STUDENT)
    copied = distilhubert.init_from_teacher(student, teacher_model)
    assert copied[:3] == ["feature_extractor", "post_extract_proj", "encoder.pos_conv"]
    assert torch.equal(student.encoder.layers[0].fc1.weight, teacher_model.encoder.layers[0].fc1.weight)
    wavs = torch.from_numpy(np.stack([c[:SR] for c in clips]))
    log = common.LossLog(tmp_path / "loss.csv", ["stage", "step", "global_step", "lr", "wall_s", "loss", "rec", "sim"])

    def step(_):
        return distilhubert.distilhubert_loss(student, teacher, wavs, [1, 2], cosine=1.0)

    loss0, m0 = step(0)
    assert {"rec", "sim", "rec_l1", "rec_l2", "sim_l1", "sim_l2"} <= set(m0)
    common.train_loop("distill", student, step, 20, OPTIM, tmp_path / "state.pt", log, 5, 100, progress=False)
    losses = [float(r["loss"]) for r in log.rows()]
    assert losses[-1] < 0.8 * losses[0], losses
    # the teacher stays frozen
    assert all(not p.requires_grad for p in teacher.parameters())


# --------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("fp16", [False, True])
def test_hubert_checkpoint_reloads_exactly(tmp_path, fp16):
    torch.manual_seed(1)
    mcfg = hubert.model_config(TINY, TRAIN, 320)
    model = hubert.build_model(mcfg, 8, 320).eval()
    state = hubert.s3prl_state(model, mcfg, 8, 320)
    path = common.save_s3prl(state, tmp_path / "h.pt", fp16=fp16)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"task_cfg", "model_cfg", "model_weight", "dictionaries_symbols"}
    assert raw["model_weight"]["encoder.layers.0.fc1.weight"].dtype == (torch.float16 if fp16 else torch.float32)
    cfg = ModelConfig(name="tiny", arch="hubert", url=None, ckpt=str(path), init="pretrained", arch_cfg=TINY)
    loaded = build_upstream(cfg)
    if fp16:
        common.round_to_half_(model)
    wav = torch.randn(2, 12_000) * 0.1
    lens = torch.tensor([12_000, 9_000])
    a, b = loaded(wav, lens), _upstream(model, "hubert", TINY)(wav, lens)
    assert len(a.hidden_states) == 3
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert torch.equal(x, y)
    assert common.verify_checkpoint(cfg, state, path, "hubert", fp16)["reload_max_abs_diff"] == 0


def test_distiller_checkpoint_reloads_exactly(tmp_path):
    from qspeech.upstream.builders import to_state

    torch.manual_seed(2)
    student = distilhubert.build_student(STUDENT).eval()
    state = to_state("distiller", student, STUDENT)
    path = common.save_s3prl(state, tmp_path / "d.ckpt", fp16=True)
    cfg = ModelConfig(name="tiny_d", arch="distiller", url=None, ckpt=str(path), init="pretrained", arch_cfg=STUDENT)
    check = common.verify_checkpoint(cfg, state, path, "distiller", fp16=True)
    assert check["reload_max_abs_diff"] == 0 and check["num_hidden"] == 1 + 1 + 2


# -------------------------------------------------------------------------------------- configs + main
def test_primary_configs_compose_and_validate():
    p = compose("pretrain")  # typed and checked (qspeech.pretrain.config)
    assert p.model.name == "tiny_hubert" and p.pretrain.iterations[0].targets == "teacher"
    d = compose("distill")
    assert d.teacher.name == "tiny_hubert" and d.model.name == "tiny_distilhubert"
    with pytest.raises(ConfigError, match="previous iteration"):
        compose("pretrain", ["pretrain.iterations=[{targets: hidden, layer: 2, clusters: 10, steps: 5}]"])


def test_pretrain_and_distill_main_end_to_end(tmp_path, clips):
    audio = tmp_path / "audio"
    audio.mkdir()
    for i, c in enumerate(clips):
        sf.write(audio / f"u{i}.wav", c, SR)
    tiny = [f"model.arch_cfg.{k}={v}" for k, v in TINY.items() if k != "conv_feature_layers"]
    tiny.append(f"model.arch_cfg.conv_feature_layers='{CNN}'")
    p = compose("pretrain", [f"run_dir={tmp_path / 'pre'}", f"pretrain.audio_dir={audio}", "pretrain.batch_size=3",
                             "pretrain.crop_seconds=1.0", "pretrain.log_every=2", "pretrain.ckpt_every=2",
                             "pretrain.kmeans.n_init=1", "threads=1", *tiny,
                             "pretrain.iterations=[{targets: mfcc, clusters: 6, steps: 4},"
                             "{targets: hidden, layer: 1, clusters: 6, steps: 2, init: previous}]"])
    s = hubert.main(p)
    out = tmp_path / "pre" / "tiny_hubert.pt"
    assert s["check"]["reload_max_abs_diff"] == 0 and out.exists()
    assert (tmp_path / "pre" / "tiny_hubert.md").read_text().count("| it") == 3  # header + it1 + it2
    assert [r["stage"] for r in common.LossLog(tmp_path / "pre" / "loss.csv", []).rows()] == ["it1"] * 2 + ["it2"]
    # init=checkpoint: a further iteration from the shipped file alone (fp16 weights loaded into fp32)
    again = ["pretrain.iterations=[{name: it3, targets: hidden, layer: 1, clusters: 5, steps: 2, init: checkpoint, "
             f"init_ckpt: '{out}'}}]"]
    common_args = [f"pretrain.audio_dir={audio}", "pretrain.batch_size=3", "pretrain.crop_seconds=1.0",
                   "pretrain.log_every=2", "pretrain.ckpt_every=2", "pretrain.kmeans.n_init=1", "threads=1", *tiny]
    p3 = compose("pretrain", [f"run_dir={tmp_path / 'pre3'}", *common_args, *again])
    r3 = hubert.setup(p3, tmp_path / "pre3")
    start = hubert.checkpoint_model(r3, p3.pretrain.iterations[0]).state_dict()
    shipped = torch.load(out, weights_only=True)["model_weight"]
    assert all(torch.equal(start[k], shipped[k].float()) for k in shipped if k != "label_embs_concat")
    s3 = hubert.main(p3)
    assert s3["iterations"][0]["init_ckpt"] == str(out) and s3["iterations"][0]["labels"]["feature_dim"] == TINY[
        "encoder_embed_dim"]
    wider = [a for a in common_args if "encoder_ffn_embed_dim" not in a] + ["model.arch_cfg.encoder_ffn_embed_dim=24"]
    p4 = compose("pretrain", [f"run_dir={tmp_path / 'pre4'}", *wider, *again])
    with pytest.raises(CheckpointError, match="does not match model=tiny_hubert's architecture"):
        hubert.checkpoint_model(hubert.setup(p4, tmp_path / "pre4"), p4.pretrain.iterations[0])
    with pytest.raises(ConfigError, match="init_ckpt"):
        compose("pretrain", ["pretrain.iterations=[{clusters: 5, steps: 2, init: checkpoint}]"])
    student = [f"model.arch_cfg.{k}={v}" for k, v in STUDENT.items()
               if k in ("encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads",
                        "conv_pos", "conv_pos_groups", "final_dim")]
    student += [f"model.arch_cfg.extractor_conv_feature_layers='{CNN}'", "model.arch_cfg.n_tasks=2",
                "model.arch_cfg.pred_layer_id=[1,2]"]
    d = compose("distill", [f"run_dir={tmp_path / 'dis'}", f"distill.audio_dir={audio}", f"teacher.ckpt={out}",
                            "distill.batch_size=3", "distill.crop_seconds=1.0", "distill.steps=3",
                            "distill.log_every=1", "threads=1", *tiny[:0], *student,
                            *[f"teacher.arch_cfg.{k}={v}" for k, v in TINY.items() if k != "conv_feature_layers"],
                            f"teacher.arch_cfg.conv_feature_layers='{CNN}'"])
    s = distilhubert.main(d)
    assert s["check"]["reload_max_abs_diff"] == 0
    assert (tmp_path / "dis" / "tiny_distilhubert.ckpt").exists() and (tmp_path / "dis" / "tiny_distilhubert.md").exists()
