"""The input pipeline at scale: DataLoader workers that read, decode and pad batches ahead give the very batches
the training process makes itself, and one feature precision holds in train, dev and test."""

import json
from pathlib import Path

import pytest
import torch

from conftest import random_upstream, run_cli

SMOKE = ["experiment=smoke", "train.num_threads=1", "cost.seconds=1", "task.lr=0.02", "export=false"]


def _run(tmp_path: Path, name: str, *overrides):
    out = tmp_path / name
    out.mkdir()
    proc = run_cli("run", *SMOKE, *overrides, cwd=out, env={"QSPEECH_CACHE": str(tmp_path / f"cache-{name}")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    [res] = (out / "outputs").rglob("result.json")
    return json.loads(res.read_text()), res.parent


@pytest.mark.parametrize("cache", ["true", "false"])
def test_dataloader_workers_give_the_single_process_results(tmp_path, cache):
    """Cached features and the live upstream: the same metrics, predictions and loss history."""
    a, dir_a = _run(tmp_path, "w0", f"train.cache_features={cache}", "train.num_workers=0")
    b, dir_b = _run(tmp_path, "w2", f"train.cache_features={cache}", "train.num_workers=2")
    volatile = {"train_wall_s", "upstream_utts_per_s", "train_utts_per_s"}
    assert {k: v for k, v in a["metrics"].items() if k not in volatile} == \
        {k: v for k, v in b["metrics"].items() if k not in volatile}
    assert (dir_a / "test_predictions.tsv").read_text() == (dir_b / "test_predictions.tsv").read_text()
    assert (dir_a / "metrics.csv").read_text() == (dir_b / "metrics.csv").read_text()  # the loss history


def test_the_batch_stream_resumes_mid_epoch_and_runs_across_epochs():
    from qspeech.train import TrainConfig, _BatchStream, epoch_batches

    cfg = TrainConfig(batch_size=2, bucket_window=2)
    lengths = [1.0, 2.0, 3.0, 4.0, 5.0]
    e0, e1 = epoch_batches(lengths, cfg, 7, 0), epoch_batches(lengths, cfg, 7, 1)
    it = iter(_BatchStream(lengths, cfg, 7, 0, 1))
    got = [next(it) for _ in range(len(e0) - 1 + len(e1))]
    assert got == e0[1:] + e1


def test_one_feature_precision_whatever_autocast_surrounds_the_upstream():
    """Training ran the upstream outside autocast and evaluation inside it: now both get train.feature_precision."""
    from qspeech.features import at_precision

    up = random_upstream()
    wavs, lens = torch.randn(2, 8000), torch.tensor([8000, 6000])
    with torch.no_grad():
        ref = up(wavs, lens).hidden_states[-1]
        fp32, key = at_precision(up, "k", "fp32")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = fp32(wavs, lens).hidden_states[-1]
            unguarded = up(wavs, lens).hidden_states[-1]
        bf16, key16 = at_precision(up, "k", "bf16")
        low = bf16(wavs, lens).hidden_states[-1]
    assert key == "k" and key16 == "k|bf16"  # bf16 features are cached apart; fp32 keys are the old ones
    assert inside.dtype == torch.float32 and torch.equal(inside, ref)
    assert unguarded.dtype == torch.bfloat16 and low.dtype == torch.bfloat16
    assert not torch.equal(low.float(), ref) and torch.allclose(low.float(), ref, atol=0.1, rtol=0.1)


def _read(path):
    from qspeech.errors import DataError

    if path.endswith("bad"):
        raise DataError(f"cannot decode {path}")
    return torch.full((1600 * int(path[-1]),), 0.1).numpy()


def test_a_worker_reports_the_files_it_could_not_read():
    """The live source's skips are recorded in the training process, from what the worker sends back."""
    from types import SimpleNamespace

    from qspeech.features import LiveSource
    from qspeech.train import batch_loader

    utts = [SimpleNamespace(utt_id=f"u{i}", path=p, duration_s=0.1) for i, p in enumerate(["a1", "bad", "b2"])]
    src = LiveSource(random_upstream(), utts, _read, torch.device("cpu"))
    task = SimpleNamespace(load_batch=lambda idx, split: src.load(idx))
    [payload] = list(batch_loader(task, [[0, 1, 2]], workers=1, pin=False))
    assert src.skipped == []  # the worker's copy of the source read it, not this one
    feats, lens, kept = src.finish(payload, torch.device("cpu"))
    assert kept == [0, 2] and src.skipped == ["bad"] and feats.shape[0] == 2
    assert torch.equal(feats, src.batch([0, 2], torch.device("cpu"))[0])
