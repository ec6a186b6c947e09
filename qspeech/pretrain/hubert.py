"""`qspeech pretrain`: HuBERT pretraining of a small s3prl HubertModel on the unlabeled split.

Iteration 1 predicts k-means units of MFCCs (+deltas), later iterations k-means units of a hidden layer of
the previous iteration's model, with HuBERT's masked-prediction objective: the model's own forward with
mask=True / features_only=False, cross-entropy over the masked frames' logits (`get_logits` /
`get_targets`, as fairseq's hubert_criterion with pred_masked_weight 1, pred_nomask_weight 0) plus the
CNN feature penalty (weight 10).

Run folder: config.yaml, loss.csv / loss.png, it<N>/{labels.npz, state.pt, hubert.pt}, tiny_hubert.pt
(the s3prl converted-format checkpoint, fp16 when fp16_asset), <name>.md (model card), summary.json.
Rerunning with run_dir=<that folder> resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qspeech.errors import CheckpointError, ConfigError
from qspeech.pretrain import cards, common
from qspeech.pretrain.config import IterationConfig, PretrainConfig, PretrainRunConfig
from qspeech.pretrain.mfcc import conv_layers, num_frames, receptive_field
from qspeech.pretrain.labels import (assign, fit_kmeans, hidden_features, label_stats, load_labels,
                                     mfcc_features, save_labels)
from qspeech.pretrain.teacher import WhisperEncoder, teacher_features
from qspeech.upstream import checkpoints
from qspeech.upstream.archs.hubert import hubert_model
from qspeech.upstream.builders import to_state

KIND = "pretrain"


# ------------------------------------------------------------------------------------------------ model
def model_config(arch_cfg: dict, train_cfg: dict, hop: int) -> dict:
    """HubertConfig fields: the architecture, the training settings, label_rate = the frame rate."""
    return {**dict(arch_cfg), **dict(train_cfg), "label_rate": float(common.SAMPLE_RATE / hop)}


def task_config(hop: int) -> dict:
    return {"normalize": False, "sample_rate": common.SAMPLE_RATE, "label_rate": float(common.SAMPLE_RATE / hop)}


def build_model(model_cfg: dict, n_clusters: int, hop: int) -> torch.nn.Module:
    return hubert_model(dict(model_cfg), task_config(hop), [list(range(n_clusters))])


def init_label_embeddings(model, how: str) -> None:
    """uniform: fairseq's U(0, 1) (all codes nearly parallel, cosine ~0.75); normal: N(0, 1) codes, nearly
    orthogonal, so the cosine logits separate the classes from the first step."""
    if how == "normal":
        with torch.no_grad():
            model.label_embs_concat.normal_()
    elif how != "uniform":
        raise ConfigError(f"pretrain.label_emb_init={how}: choose uniform or normal")


def masked_prediction_loss(model, wavs: torch.Tensor, targets: torch.Tensor, feature_pen: float = 10.0,
                           masked_weight: float = 1.0, nomask_weight: float = 0.0):
    """(loss, metrics) as fairseq's hubert_criterion: masked_weight * CE(masked frames) + nomask_weight *
    CE(unmasked frames) + feature_pen * CNN feature penalty, each CE the mean over its frames (HuBERT
    Base: weights 1 / 0, the model built with skip_nomask when nomask_weight is 0).

    wavs (B, T) unpadded crops; targets (B, frames) cluster ids aligned with the CNN frames."""
    pad = torch.zeros_like(wavs, dtype=torch.bool)
    out = model(wavs, target_list=[targets], padding_mask=pad, mask=True, features_only=False)
    loss, metrics = feature_pen * out["features_pen"], {}
    for tag, weight, masked in (("m", masked_weight, True), ("u", nomask_weight, False)):
        if weight <= 0 and not masked:
            continue
        logits, tgts = model.get_logits(out, is_masked=masked), model.get_targets(out, is_masked=masked)
        n = sum(t.numel() for t in tgts)
        ce = sum(F.cross_entropy(lg, t, reduction="sum") for lg, t in zip(logits, tgts)) / max(n, 1)
        loss = loss + weight * ce
        metrics[f"ce_{tag}"] = float(ce.detach())
        metrics[f"acc_{tag}"] = sum(float((lg.argmax(-1) == t).sum()) for lg, t in zip(logits, tgts)) / max(n, 1)
        if masked:
            metrics["masked_frac"] = n / targets.numel()
    metrics["feat_pen"] = float(out["features_pen"].detach())
    return loss, metrics


def s3prl_state(model, model_cfg: dict, n_clusters: int, hop: int) -> dict:
    return to_state("hubert", model, model_cfg, {"task_cfg": task_config(hop),
                                                "dictionaries_symbols": [list(range(n_clusters))]})


# ----------------------------------------------------------------------------------------------- labels
def make_labels(corpus, it: IterationConfig, prev_model, p: PretrainConfig, layers, seed: int, path: Path, threads: int = 1):
    ids = [c.utt_id for c in corpus.clips]
    if path.exists():
        loaded = load_labels(path, ids)
        if loaded is not None:
            return (*loaded, False)
    t0 = time.time()
    extra = {}
    if it.targets == "mfcc":
        window, hop = receptive_field(layers)
        feats = mfcc_features(corpus, window, hop, p.mfcc)
    elif it.targets == "teacher":
        enc = WhisperEncoder(p.teacher.model_dir, threads)
        feats = teacher_features(corpus, lambda n: num_frames(n, layers), enc)
        extra = {"teacher": "whisper tiny.en encoder (CTranslate2)", "teacher_sha256": enc.sha256()}
    else:
        feats = hidden_features(prev_model, corpus, int(it.layer))
    km = fit_kmeans(feats, int(it.clusters), p.kmeans, seed)
    labels = assign(feats, km)
    stats = {**label_stats(labels, int(it.clusters)), "feature_dim": int(feats[0].shape[1]),
             "fit_frames": km["fit_frames"], "seconds": round(time.time() - t0, 1), **extra}
    save_labels(path, ids, labels, km, stats)
    print(f"[labels {path.parent.name}] {it.targets}: {stats}", flush=True)
    return labels, stats, True


# ------------------------------------------------------------------------------------------------- main
@dataclass
class PretrainRun:
    """What the iterations of one pretraining run share."""

    cfg: PretrainRunConfig
    folder: Path
    arch_cfg: dict
    train_cfg: dict  # HubertConfig's training fields (masking, dropout, ...)
    layers: list  # the CNN's (channels, kernel, stride)
    hop: int  # samples per frame
    crop: int  # samples per training crop
    corpus: common.Corpus
    log: common.LossLog


def setup(cfg: PretrainRunConfig, folder: Path) -> PretrainRun:
    """The CNN's framing, the corpus and the loss log of a run."""
    p = cfg.pretrain
    arch_cfg = dict(cfg.model.arch_cfg)
    layers = conv_layers(str(arch_cfg.get("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")))
    window, hop = receptive_field(layers)
    crop = int(float(p.crop_seconds) * common.SAMPLE_RATE)
    corpus = common.load_corpus(cfg, p, max(window + 4 * hop, int(float(p.min_seconds) * common.SAMPLE_RATE)))
    print(f"[pretrain] corpus: {corpus.description}: {len(corpus)} utterances, {corpus.hours:.2f} h", flush=True)
    train_cfg = dataclasses.asdict(p.hubert)
    train_cfg["skip_nomask"] = p.loss.nomask_weight <= 0
    log = common.LossLog(folder / "loss.csv", ["stage", "step", "global_step", "lr", "wall_s", "loss", "ce_m", "acc_m",
                                               "ce_u", "acc_u", "feat_pen", "masked_frac", "grad_norm"])
    return PretrainRun(cfg, folder, arch_cfg, train_cfg, layers, hop, crop, corpus, log)


def iteration_model(r: PretrainRun, i: int, it: IterationConfig, prev) -> tuple[torch.nn.Module, dict]:
    """Iteration i's model (seeded by the iteration) and its HubertConfig; init=previous (checkpoint) starts
    from the previous iteration's (the checkpoint's) weights, all but the label embeddings."""
    mcfg = model_config(r.arch_cfg, r.train_cfg, r.hop)
    torch.manual_seed(int(r.cfg.seed) + 1000 * i)
    model = build_model(mcfg, int(it.clusters), r.hop)
    init_label_embeddings(model, r.cfg.pretrain.label_emb_init)
    if it.init in ("previous", "checkpoint"):
        sd = {n_: t for n_, t in prev.state_dict().items() if n_ != "label_embs_concat"}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert missing == ["label_embs_concat"] and not unexpected, (missing, unexpected)
    return model, mcfg


def checkpoint_model(r: PretrainRun, it: IterationConfig) -> torch.nn.Module:
    """init=checkpoint: the model of it.init_ckpt (an s3prl-format HuBERT checkpoint of this run's
    architecture; fp16 weights load into fp32), standing in for the previous iteration."""
    path = Path(str(it.init_ckpt)).expanduser()
    if not path.is_file():
        raise CheckpointError(f"init_ckpt={path}: no such file; point it at a HuBERT checkpoint such as "
                              "qspeech/assets/tiny_hubert.pt")
    state = checkpoints.load(path)
    checkpoints.check_format(state, "hubert", path)
    model = build_model(model_config(r.arch_cfg, r.train_cfg, r.hop), int(it.clusters), r.hop)
    weights = {k: v for k, v in state["model_weight"].items() if k != "label_embs_concat"}
    own = {k: v for k, v in model.state_dict().items() if k != "label_embs_concat"}
    wrong = sorted(k for k in own if k not in weights or tuple(weights[k].shape) != tuple(own[k].shape))
    extra = sorted(k for k in weights if k not in own)
    if wrong or extra:
        raise CheckpointError(f"init_ckpt={path} does not match model={r.cfg.model.name}'s architecture "
                              f"({len(wrong)} missing or differently shaped tensors, e.g. {(wrong or extra)[0]}); "
                              "use the checkpoint of the same model")
    model.load_state_dict(weights, strict=False)
    return model.eval()


def train_iteration(r: PretrainRun, i: int, it: IterationConfig, prev, offset: int) -> tuple[dict, torch.nn.Module, float]:
    """Labels, model and training of iteration i (each resumes or is skipped when done); returns its record,
    its model and the seconds this invocation spent on it."""
    cfg, p = r.cfg, r.cfg.pretrain
    name = it.name or f"it{i + 1}"
    d = r.folder / name
    d.mkdir(exist_ok=True)
    k = int(it.clusters)
    if it.init == "checkpoint":
        prev = checkpoint_model(r, it)
    sub = r.corpus
    if it.max_utts and it.max_utts < len(r.corpus):  # e.g. to bound hidden-feature extraction
        rng = np.random.default_rng([int(cfg.seed), i])
        sub = r.corpus.subset(sorted(rng.choice(len(r.corpus), int(it.max_utts), replace=False).tolist()))
    labels, stats, fresh = make_labels(sub, it, prev, p, r.layers, int(cfg.seed) + i, d / "labels.npz",
                                       cfg.threads or 1)
    for lab, n in zip(labels, sub.lengths):
        assert len(lab) == num_frames(int(n), r.layers), "labels must match the CNN's frames"
    model, mcfg = iteration_model(r, i, it, prev)
    batches = common.CropBatches(sub.lengths, int(p.batch_size), r.crop, r.hop, int(cfg.seed) * 7919 + i)

    def step_fn(step):
        wavs, idx, length, starts = batches.waves(sub, step)
        n = num_frames(length, r.layers)
        tg = np.stack([labels[j][s // r.hop : s // r.hop + n] for j, s in zip(idx, starts)]).astype(np.int64)
        return masked_prediction_loss(model, wavs, torch.from_numpy(tg), float(p.loss.features_pen),
                                      p.loss.masked_weight, p.loss.nomask_weight)

    final = d / "hubert.pt"
    res = common.train_loop(name, model, step_fn, int(it.steps), p.optim, d / "state.pt", r.log,
                            int(p.log_every), int(p.ckpt_every), offset)  # resumes / returns if done
    if not final.exists():
        common.save_s3prl(s3prl_state(model, mcfg, k, r.hop), final, fp16=False)
    model.eval()
    record = {"name": name, "targets": it.targets, "layer": it.layer, "clusters": k,
              "init": it.init, **({"init_ckpt": str(it.init_ckpt)} if it.init_ckpt else {}), "steps": int(it.steps), "labels": stats,
              "utterances": len(sub), "checkpoint": str(final),
              "first": res["first"], "final": res["last"], "train_wall_s": round(res["wall_s"], 1)}
    return record, model, res["wall_this_s"] + (stats["seconds"] if fresh else 0.0)


def ship(r: PretrainRun, iterations: list[dict]) -> tuple[Path, dict, dict]:
    """The shipped checkpoint: the last (or pretrain.ship) iteration's model, fp16 when asked, checked through
    build_upstream. Returns its path, its fp32 state and the check."""
    p = r.cfg.pretrain
    name = p.ship or iterations[-1]["name"]
    shipped = next((it for it in iterations if it["name"] == name), None)
    if shipped is None:
        raise ConfigError(f"pretrain.ship={name}: no such iteration ({', '.join(it['name'] for it in iterations)})")
    shipped["shipped"] = True
    out = r.folder / f"{r.cfg.model.name}.pt"
    state = torch.load(shipped["checkpoint"], map_location="cpu", weights_only=True)
    common.save_s3prl(state, out, fp16=bool(p.fp16_asset))
    return out, state, common.verify_checkpoint(r.cfg.model, state, out, "hubert", bool(p.fp16_asset))


def summarize(r: PretrainRun, iterations: list[dict], out: Path, state: dict, check: dict, other_s: float) -> dict:
    """summary.json's content; other_s: this invocation's seconds outside training and labelling."""
    cfg, p = r.cfg, r.cfg.pretrain
    return {
        "model": cfg.model.name, "arch": "hubert", "checkpoint": str(out), "bytes": out.stat().st_size,
        "fp16": bool(p.fp16_asset), "params": sum(t.numel() for t in state["model_weight"].values()),
        "shipped": next(it["name"] for it in iterations if it.get("shipped")),
        "corpus": {"source": r.corpus.description, "utterances": len(r.corpus), "hours": round(r.corpus.hours, 3)},
        "seed": int(cfg.seed), "batch_size": int(p.batch_size), "crop_seconds": float(p.crop_seconds),
        "iterations": iterations,
        "wall_s": round(sum(it["train_wall_s"] + it["labels"]["seconds"] for it in iterations) + max(0.0, other_s), 1),
        "train_wall_s": round(sum(it["train_wall_s"] for it in iterations), 1), "check": check,
        "command": cfg.command_line or common.command_line(KIND, common.hydra_overrides()),
        "env": common.env_info(), "run_dir": str(r.folder), "arch_cfg": r.arch_cfg, "train_cfg": r.train_cfg,
        "optim": dataclasses.asdict(p.optim), "loss": dataclasses.asdict(p.loss), "label_emb_init": p.label_emb_init,
    }


def main(cfg: PretrainRunConfig) -> dict:
    """Run HuBERT pretraining as configured by conf/pretrain.yaml (typed: qspeech.config.to_typed); returns the
    summary dict."""
    folder, t_start = common.start_run(cfg, KIND)
    r = setup(cfg, folder)
    iterations, prev, offset, accounted = [], None, 0, 0.0
    for i, it in enumerate(cfg.pretrain.iterations):
        record, prev, seconds = train_iteration(r, i, it, prev, offset)
        iterations.append(record)
        offset += int(it.steps)
        accounted += seconds
        r.log.plot(folder / "loss.png", ["ce_m", "acc_m"], f"HuBERT pretraining: {cfg.model.name}")
    out, state, check = ship(r, iterations)
    summary = summarize(r, iterations, out, state, check, time.time() - t_start - accounted)
    return common.finish_run(cfg, KIND, folder, summary, cards.hubert_card(summary), out)
