"""`qspeech distill`: DistilHuBERT's recipe (s3prl pretrain/distiller) from a HuBERT teacher to s3prl's
DistillerModel: a 2-layer student whose CNN, input projection, positional convolution and first layers
are copied from the teacher (init_teacher_conv_layers / init_teacher_encoder_layers), with prediction
heads for teacher layers pred_layer_id, trained with L1 + lambda * (-log sigmoid(cosine)) per frame and
dimension (lambda = cosine_loss = 1), averaged over heads.

Run folder: config.yaml, loss.csv / loss.png, state.pt, <name>.ckpt (s3prl's distiller format, fp16
when fp16_asset), <name>.md (model card), summary.json. run_dir=<folder> resumes.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

from qspeech.pretrain import cards, common
from qspeech.pretrain.config import DistillRunConfig
from qspeech.pretrain.mfcc import conv_layers, receptive_field
from qspeech.upstream import build_upstream
from qspeech.upstream.archs.distiller import distiller_model
from qspeech.upstream.builders import to_state

KIND = "distill"


def build_student(student_cfg: dict) -> torch.nn.Module:
    return distiller_model(dict(student_cfg))


def init_from_teacher(student, teacher, conv: bool = True, encoder: bool = True, encoder_norm: bool = True) -> list[str]:
    """Copy the teacher's modules into the student as s3prl's DistillerForPretrain does; encoder_norm also
    copies the encoder's input LayerNorm (s3prl leaves it at its init). Returns what was copied."""
    copied = []
    if conv:
        student.feature_extractor.load_state_dict(teacher.feature_extractor.state_dict())
        copied.append("feature_extractor")
        if student.post_extract_proj is not None:
            student.post_extract_proj.load_state_dict(teacher.post_extract_proj.state_dict())
            copied.append("post_extract_proj")
    if encoder:
        student.encoder.pos_conv.load_state_dict(teacher.encoder.pos_conv.state_dict())
        copied.append("encoder.pos_conv")
        for i, layer in enumerate(student.encoder.layers):
            layer.load_state_dict(teacher.encoder.layers[i].state_dict())
            copied.append(f"encoder.layers.{i}")
        if encoder_norm:
            student.encoder.layer_norm.load_state_dict(teacher.encoder.layer_norm.state_dict())
            copied.append("encoder.layer_norm")
    return copied


def distilhubert_loss(student, teacher, wavs: torch.Tensor, pred_layer_id, cosine: float = 1.0,
                      loss_type: str = "l1", feat_pen: float = 0.0):
    """(loss, metrics) of DistillerForPretrain.compute_loss; `teacher` is a qspeech Upstream (frozen)."""
    with torch.no_grad():
        states = teacher(wavs).hidden_states
        target = torch.stack([states[i] for i in pred_layer_id], dim=1)  # B x N x T x D
    feat, _, pred, _ = student(wavs, torch.ones_like(wavs))
    t = min(pred.shape[2], target.shape[2])
    pred, target = pred[:, :, :t], target[:, :, :t]
    rec = (F.l1_loss if loss_type == "l1" else F.mse_loss)(pred, target, reduction="none")
    rec_layer = rec.detach().mean((0, 2, 3))
    sim = -F.logsigmoid(F.cosine_similarity(pred, target, dim=-1))
    sim_layer = sim.detach().mean((0, 2))
    pen = feat.float().pow(2).mean()
    loss = rec.mean() + cosine * sim.mean() + feat_pen * pen
    metrics = {"rec": float(rec_layer.mean()), "sim": float(sim_layer.mean()),
               "cos": float(F.cosine_similarity(pred, target, dim=-1).detach().mean())}
    for i, lid in enumerate(pred_layer_id):
        metrics[f"rec_l{lid}"] = float(rec_layer[i])
        metrics[f"sim_l{lid}"] = float(sim_layer[i])
    return loss, metrics


def save_student(cfg: DistillRunConfig, student, student_cfg: dict, teacher, run) -> tuple:
    """The student as an s3prl distiller checkpoint in the run folder (naming its teacher), reloaded and checked
    (common.verify_checkpoint); returns (path, check)."""
    state = to_state("distiller", student, student_cfg)
    state["Config"]["teacher"] = {"model": cfg.teacher.name, "n_layers": int(cfg.teacher.arch_cfg.get("encoder_layers", 12)),
                                  "checkpoint_sha256": teacher.spec.source_sha256}
    out = run / f"{cfg.model.name}.ckpt"
    common.save_s3prl(state, out, fp16=bool(cfg.distill.fp16_asset))
    return out, common.verify_checkpoint(cfg.model, state, out, "distiller", bool(cfg.distill.fp16_asset))


def main(cfg: DistillRunConfig) -> dict:
    """Run the distillation as configured by conf/distill.yaml (typed: qspeech.config.to_typed); returns the
    summary dict."""
    d = cfg.distill
    run, t_start = common.start_run(cfg, KIND)

    teacher = build_upstream(cfg.teacher)
    teacher.requires_grad_(False)
    teacher.eval()
    arch_cfg = dict(cfg.model.arch_cfg)
    student_cfg = {**arch_cfg, **dataclasses.asdict(d.student)}
    torch.manual_seed(int(cfg.seed))
    student = build_student(student_cfg)
    copied = init_from_teacher(student, teacher.model, bool(student_cfg.get("init_teacher_conv_layers")),
                               bool(student_cfg.get("init_teacher_encoder_layers")),
                               d.init_encoder_layer_norm)
    layers = conv_layers(str(arch_cfg["extractor_conv_feature_layers"]))
    window, hop = receptive_field(layers)
    corpus = common.load_corpus(cfg, d, max(window + 4 * hop, int(float(d.min_seconds) * common.SAMPLE_RATE)))
    print(f"[distill] corpus: {corpus.description}: {len(corpus)} utterances, {corpus.hours:.2f} h; teacher "
          f"{teacher.spec.source}; student initialised with {', '.join(copied) or 'nothing'}", flush=True)
    batches = common.CropBatches(corpus.lengths, int(d.batch_size), int(float(d.crop_seconds) * common.SAMPLE_RATE),
                                 hop, int(cfg.seed) * 7919 + 17)
    pred_ids = [int(i) for i in arch_cfg["pred_layer_id"]]
    log = common.LossLog(run / "loss.csv", ["stage", "step", "global_step", "lr", "wall_s", "loss", "rec", "sim", "cos",
                                            *[f"{m}_l{i}" for i in pred_ids for m in ("rec", "sim")], "grad_norm"])

    def step_fn(step):
        wavs = batches.waves(corpus, step)[0]
        return distilhubert_loss(student, teacher, wavs, pred_ids, float(student_cfg.get("cosine_loss", 1.0)),
                            str(student_cfg.get("loss_type", "l1")), float(student_cfg.get("feat_pen_loss", 0.0)))

    res = common.train_loop("distill", student, step_fn, int(d.steps), d.optim, run / "state.pt", log,
                            int(d.log_every), int(d.ckpt_every))
    log.plot(run / "loss.png", ["rec", "sim"], f"DistilHuBERT: {cfg.teacher.name} -> {cfg.model.name}")
    student.eval()
    out, check = save_student(cfg, student, student_cfg, teacher, run)
    summary = {
        "model": cfg.model.name, "arch": "distiller", "checkpoint": str(out), "bytes": out.stat().st_size,
        "fp16": bool(d.fp16_asset), "params": sum(t.numel() for t in student.parameters()),
        "teacher": {"name": cfg.teacher.name, "source": teacher.spec.source, "sha256": teacher.spec.source_sha256},
        "initialised_from_teacher": copied,
        "corpus": {"source": corpus.description, "utterances": len(corpus), "hours": round(corpus.hours, 3)},
        "seed": int(cfg.seed), "batch_size": int(d.batch_size), "crop_seconds": float(d.crop_seconds),
        "steps": int(d.steps), "first": res["first"], "final": res["last"], "train_wall_s": round(res["wall_s"], 1),
        "wall_s": round(res["wall_s"] + max(0.0, time.time() - t_start - res["wall_this_s"]), 1), "check": check,
        "command": cfg.command_line or common.command_line(KIND, common.hydra_overrides()),
        "env": common.env_info(), "run_dir": str(run), "student_cfg": student_cfg,
        "optim": dataclasses.asdict(d.optim),
    }
    return common.finish_run(cfg, KIND, run, summary, cards.distill_card(summary), out)
