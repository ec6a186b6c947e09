"""Results files and the report: atomic writes, failed runs kept, unreadable files skipped, paper rows."""

import json

import pandas as pd

from qspeech.report import build_table, make_report
from qspeech.results import RunResult, collect, load_results, write_json_atomic


def _result(model, bits, value, status="ok", quant="rtn", finished="2026-01-01T00:00:00", **kw):
    return {"model": model, "init": "pretrained", "quant": quant, "targets": ["linear"], "bits": bits,
            "task": "asr_small", "data": "mini", "status": status, "metric": "wer", "value": value,
            "storage_mb": 10.0 * bits / 32 + 1, "est_runtime": 0.5 + bits / 64, "finished": finished, **kw}


def test_write_json_atomic_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a" / "result.json"
    write_json_atomic(path, {"x": 1})
    write_json_atomic(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_report_keeps_failed_skips_unreadable_and_adds_paper(tmp_path):
    out = tmp_path / "outputs"
    write_json_atomic(out / "r1" / "result.json", _result("tiny_hubert", 32, 20.0))
    write_json_atomic(out / "r2" / "result.json", _result("tiny_hubert", 2, 40.0))
    write_json_atomic(out / "r3" / "result.json", _result("tiny_hubert", 1, None, status="failed", error="boom"))
    write_json_atomic(out / "r4" / "result.json", _result("tiny_distilhubert", 32, 30.0))
    (out / "r5").mkdir()
    (out / "r5" / "result.json").write_text("{not json")
    rep = make_report(out)
    assert rep["runs"] == 4 and len(rep["problems"]) == 1 and "r5" in rep["problems"][0]
    table = pd.read_csv(rep["csv"])
    ours = table[table.source == "qspeech"]
    assert set(ours.status) == {"ok", "failed"}
    failed = ours[ours.bits == 1].iloc[0]
    assert failed.status == "failed" and failed.error == "boom"
    paper = table[table.source.str.startswith("paper")]
    assert sorted(paper.storage_mb) == [25.23, 35.84, 46.98, 184.42]
    # DistilHuBERT comparison: ratio of storage, difference of WER, against tiny_distilhubert
    row = ours[(ours.bits == 2)].iloc[0]
    distil = ours[ours.model == "tiny_distilhubert"].iloc[0]
    assert row.storage_vs_distil == round(row.storage_mb / distil.storage_mb, 3)
    assert row.metric_vs_distil == round(40.0 - 30.0, 2)
    p2 = paper[paper.bits == 2].iloc[0]
    assert p2.storage_vs_distil == round(35.84 / 46.98, 3) and p2.metric_vs_distil == round(12.68 - 13.37, 2)
    md = rep["markdown"].read_text()
    assert "failed: tiny_hubert rtn 1-bit" in md and "Yeh et al." in md
    assert rep["plot"] is not None and rep["plot"].stat().st_size > 0


def test_one_row_per_experiment_latest_success_wins(tmp_path):
    results = [
        _result("tiny_hubert", 4, 30.0, finished="2026-01-01T00:00:00"),
        _result("tiny_hubert", 4, 25.0, finished="2026-01-02T00:00:00"),
        _result("tiny_hubert", 4, None, status="failed", finished="2026-01-03T00:00:00"),
    ]
    ours = build_table([RunResult.from_dict(r) for r in results])
    ours = ours[ours.source == "qspeech"]
    assert len(ours) == 1 and ours.iloc[0].value == 25.0


def test_collect_rejects_results_without_required_keys(tmp_path):
    write_json_atomic(tmp_path / "x" / "result.json", {"hello": 1})
    results, problems = collect(tmp_path)
    assert results == [] and "missing" in problems[0]
    results, problems = load_results(tmp_path)
    assert results == [] and "missing" in problems[0] and "model" in problems[0]


def test_measured_speed_from_bench_runs_joins_matching_rows(tmp_path):
    out = tmp_path / "outputs"
    write_json_atomic(out / "r1" / "result.json", _result("tiny_hubert", 2, 40.0))
    write_json_atomic(out / "r2" / "result.json", _result("tiny_hubert", 8, 22.0))
    variants = {"torch_fp32": {"measured_speedup": {"vs_torch_fp32": 1.0, "vs_ort_fp32": 0.5}},
                "nbits_2bit": {"measured_speedup": {"vs_torch_fp32": 1.72, "vs_ort_fp32": 0.96}}}
    write_json_atomic(out / "b" / "bench.json", {"model": "tiny_hubert", "quant": {"method": "rtn"}, "variants": variants})
    table = pd.read_csv(make_report(out)["csv"])
    ours = table[table.source == "qspeech"].set_index("bits")
    assert ours.loc[2, "measured_speedup"] == 1.72 and ours.loc[2, "measured_vs_ort"] == 0.96
    assert pd.isna(ours.loc[8, "measured_speedup"])  # no int8 variant was measured: left empty, not guessed


def test_atomic_files_get_normal_permissions(tmp_path):
    import os

    path = write_json_atomic(tmp_path / "result.json", {"x": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_torch_save_atomic_bytes_depend_on_the_object_only(tmp_path):
    """torch.save names zip records after the file written; a temp name there made rebuilt checkpoints
    differ byte-wise from identical ones (it happened to `make assets`)."""
    import hashlib
    import os
    import zipfile

    import torch

    from qspeech.atomic import torch_save_atomic

    obj = {"w": torch.arange(6.0).reshape(2, 3), "meta": {"steps": 3}}
    a = torch_save_atomic(obj, tmp_path / "a" / "model.pt")
    b = torch_save_atomic(obj, tmp_path / "b" / "model.pt")
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    assert {n.split("/")[0] for n in zipfile.ZipFile(a).namelist()} == {"model"}  # the stem, no temp name
    assert os.listdir(tmp_path / "a") == ["model.pt"]  # no temp folder left behind
    assert torch.equal(torch.load(a, weights_only=True)["w"], obj["w"])
