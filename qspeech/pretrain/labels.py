"""HuBERT's pseudo-labels: k-means units of MFCCs (iteration 1) or of a hidden layer (later iterations),
one label per 20 ms frame of the upstream (see mfcc.py for the frame alignment)."""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from tqdm import tqdm

from qspeech.pretrain.mfcc import mfcc


def mfcc_features(corpus, window: int, hop: int, mcfg) -> list[np.ndarray]:
    return [
        mfcc(corpus.wav(i), window=window, hop=hop, n_mels=int(mcfg.n_mels), n_ceps=int(mcfg.n_ceps),
             n_deltas=int(mcfg.n_deltas), cmn=bool(mcfg.cmn))
        for i in tqdm(range(len(corpus)), desc="mfcc", mininterval=5, leave=False)
    ]


@torch.no_grad()
def hidden_features(model, corpus, layer: int) -> list[np.ndarray]:
    """Output of transformer layer `layer` (1-based) of a HubertModel, one utterance at a time (no
    padding, so group norm statistics are exactly the utterance's own)."""
    was_training = model.training
    model.eval()
    feats = []
    for i in tqdm(range(len(corpus)), desc=f"layer {layer}", mininterval=5, leave=False):
        wav = torch.from_numpy(corpus.wav(i))[None]
        x, _ = model.extract_features(wav, padding_mask=torch.zeros_like(wav, dtype=torch.bool), mask=False,
                                      output_layer=layer)
        feats.append(x[0].numpy().astype(np.float32))
    model.train(was_training)
    return feats


def fit_kmeans(feats: list[np.ndarray], n_clusters: int, kcfg, seed: int) -> dict:
    """MiniBatchKMeans as fairseq's learn_kmeans.py (k-means++, batch 10000, no reassignment), on at most
    kcfg.max_frames frames; features are standardised per dimension first when kcfg.standardize."""
    from sklearn.cluster import MiniBatchKMeans  # heavy: only pretraining clusters labels

    t0 = time.time()
    x = np.concatenate(feats)
    rng = np.random.default_rng(seed)
    if len(x) > int(kcfg.max_frames):
        x = x[rng.choice(len(x), int(kcfg.max_frames), replace=False)]
    mean = x.mean(0) if kcfg.standardize else np.zeros(x.shape[1], np.float32)
    std = x.std(0) + 1e-5 if kcfg.standardize else np.ones(x.shape[1], np.float32)
    km = MiniBatchKMeans(
        n_clusters=n_clusters, init="k-means++", max_iter=int(kcfg.max_iter), batch_size=int(kcfg.batch_size),
        tol=0.0, max_no_improvement=100, n_init=int(kcfg.n_init), reassignment_ratio=0.0, random_state=seed,
        compute_labels=False,
    )
    km.fit((x - mean) / std)
    return {
        "centers": km.cluster_centers_.astype(np.float32), "mean": mean.astype(np.float32),
        "std": std.astype(np.float32), "fit_frames": len(x), "fit_s": time.time() - t0,
    }


def assign(feats: list[np.ndarray], km: dict) -> list[np.ndarray]:
    c = torch.from_numpy(km["centers"])
    out = []
    for f in feats:
        z = torch.from_numpy((f - km["mean"]) / km["std"])
        out.append(torch.cdist(z, c).argmin(1).numpy().astype(np.int16))
    return out


def label_stats(labels: list[np.ndarray], n_clusters: int) -> dict:
    counts = np.bincount(np.concatenate(labels), minlength=n_clusters).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"frames": int(counts.sum()), "used_clusters": int((counts > 0).sum()),
            "perplexity": float(np.exp(-(nz * np.log(nz)).sum()))}


def save_labels(path, utt_ids: list[str], labels: list[np.ndarray], km: dict, stats: dict) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, utt_ids=np.array(utt_ids), lengths=np.array([len(l) for l in labels]),
             labels=np.concatenate(labels), centers=km["centers"], mean=km["mean"], std=km["std"],
             stats=np.array(json.dumps(stats)))
    tmp.replace(path)


def load_labels(path, utt_ids: list[str]) -> tuple[list[np.ndarray], dict] | None:
    """Labels saved by save_labels, or None if they were made for other utterances."""
    z = np.load(path)
    if list(z["utt_ids"]) != list(utt_ids):
        return None
    labels = np.split(z["labels"], np.cumsum(z["lengths"])[:-1])
    return labels, json.loads(str(z["stats"]))
