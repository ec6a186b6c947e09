"""Results files and the report: atomic writes, failed runs kept, unreadable files skipped, paper rows."""

import json
from pathlib import Path

import pandas as pd
import pytest

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


def test_replicates_are_aggregated_and_failures_kept(tmp_path):
    """Runs of one experiment (no config recorded: older files) are one row; a failed rerun is its own row."""
    results = [
        _result("tiny_hubert", 4, 30.0, finished="2026-01-01T00:00:00"),
        _result("tiny_hubert", 4, 26.0, finished="2026-01-02T00:00:00"),
        _result("tiny_hubert", 4, None, status="failed", error="boom", finished="2026-01-03T00:00:00"),
    ]
    ours = build_table([RunResult.from_dict(r) for r in results])
    ours = ours[ours.source == "qspeech"].set_index("status")
    assert len(ours) == 2
    assert ours.loc["ok", "value"] == 28.0 and ours.loc["ok", "n"] == 2
    assert ours.loc["ok", "value_std"] == pytest.approx(2 ** 0.5 * 2)  # sample std of 30, 26
    assert ours.loc["failed", "error"] == "boom"


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
    variants = {"torch_fp32": {"bits": 32, "measured_speedup": {"vs_torch_fp32": 1.0, "vs_ort_fp32": 0.5}},
                "int8_w2a8": {"bits": 2, "measured_speedup": {"vs_torch_fp32": 1.3, "vs_ort_fp32": 0.72}},
                "nbits_2bit": {"bits": 2, "measured_speedup": {"vs_torch_fp32": 1.72, "vs_ort_fp32": 0.96}},
                "torch_bf16": {"bits": 16, "measured_speedup": {"vs_torch_fp32": 0.1, "vs_ort_fp32": 0.05}}}
    write_json_atomic(out / "b" / "bench.json", {"model": "tiny_hubert", "quant": {"method": "rtn"}, "variants": variants})
    table = pd.read_csv(make_report(out)["csv"])
    ours = table[table.source == "qspeech"].set_index("bits")
    # the fastest kernel measured at the row's bits
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


# ------------------------------------------------------------------ every run kept: sweeps, seeds, failures

def _config(seed=0, lr=0.002, bits=32, method="rtn", n_train=800, max_steps=1000, init="pretrained", **extra):
    """The part of a recorded config (result.json's `config`) these tests vary; the rest is constant."""
    return {"model": {"name": "tiny_hubert", "init": init, "ckpt": None},
            "quant": {"method": method, "targets": ["linear"], "steps": 150 if method == "bit" else 0},
            "task": {"name": "asr_small", "lr": lr}, "data": {"name": "mini", "mini": {"n_train": n_train}},
            "train": {"max_steps": max_steps, "num_threads": 1}, "bits": bits, "seed": seed,
            "cache_dir": f"/tmp/cache{seed}", **extra}


def _run(out, name, bits, value, cer=None, **cfg):
    status = "ok" if value is not None else "failed"
    extra = {"error": f"ValueError: job {name} exploded"} if status == "failed" else {}
    res = _result("tiny_hubert", bits, value, status=status, config=_config(bits=bits, **cfg),
                  init=cfg.get("init", "pretrained"), **extra)
    if cer is not None:
        res["metrics"] = {"metric": "wer", "value": value, "cer": cer}
    write_json_atomic(out / "run" / name / "result.json", res)


def _ours(rep):
    table = pd.read_csv(rep["csv"], dtype={c: object for c in ("overrides", "flags", "seeds")})
    for c in ("overrides", "flags", "seeds"):  # empty cells are "" (pandas reads them as NaN)
        table[c] = table[c].where(table[c].notna(), "")
    return table[table.source == "qspeech"]


def test_seed_sweep_is_one_row_with_mean_std_n_and_rise_from_means(tmp_path):
    out = tmp_path / "outputs"
    for seed, (fp, q) in enumerate([(60.0, 90.0), (62.0, 93.0), (64.0, 96.0)]):
        _run(out, f"fp_s{seed}", 32, fp, cer=20.0 + seed, seed=seed)
        _run(out, f"q2_s{seed}", 2, q, seed=seed)
    rep = make_report(out)
    ours = _ours(rep).set_index("bits")
    assert rep["runs"] == 6 and len(ours) == 2
    assert ours.loc[32, "value"] == 62.0 and ours.loc[32, "value_std"] == 2.0 and ours.loc[32, "n"] == 3
    assert ours.loc[32, "seeds"] == "0,1,2" and ours.loc[32, "cer"] == 21.0 and ours.loc[32, "cer_std"] == 1.0
    assert ours.loc[2, "value"] == 93.0 and ours.loc[2, "value_std"] == 3.0
    assert ours.loc[2, "rise_pct"] == 50.0  # (93 - 62) / 62, from the means
    assert set(ours.overrides) == {""}  # seeds, cache dirs and thread counts do not split rows
    md = rep["markdown"].read_text()
    assert "62.00 ± 2.00 (n=3)" in md and "93.00 ± 3.00 (n=3)" in md and "+50.0 %" in md


def test_lr_sweep_gives_rows_labelled_by_lr(tmp_path):
    out = tmp_path / "outputs"
    for lr, value in [(0.001, 70.0), (0.002, 65.0), (0.004, 80.0)]:
        _run(out, f"lr{lr}", 32, value, lr=lr)
    _run(out, "lr0.002_s1", 32, 67.0, lr=0.002, seed=1)  # a second seed of one of them
    ours = _ours(make_report(out)).set_index("overrides")
    assert sorted(ours.index) == ["task.lr=0.001", "task.lr=0.002", "task.lr=0.004"]
    assert ours.loc["task.lr=0.001", "value"] == 70.0 and ours.loc["task.lr=0.001", "n"] == 1
    assert ours.loc["task.lr=0.002", "value"] == 66.0 and ours.loc["task.lr=0.002", "n"] == 2


def test_runtime_outside_and_unknown_config_keys_never_set_runs_apart(tmp_path):
    """Which recorded keys tell experiments apart comes from the schema (qspeech.identity): runtime and outside
    fields (data.workers, train.num_threads, the logger, cache_dir) and keys the schema no longer has (an older
    version's) leave the runs of one experiment together; a field of the recorded method's own class counts."""
    out = tmp_path / "outputs"
    rtn = {"method": "rtn", "targets": ["linear"], "symmetric": False}
    _run(out, "a", 2, 60.0, seed=0, quant=rtn)
    _run(out, "b", 2, 62.0, seed=1, quant=rtn | {"log_every": 5}, logger={"name": "mlflow"}, retired_key=3,
         data={"name": "mini", "mini": {"n_train": 800}, "workers": 4, "max_skipped": 0.5},
         train={"max_steps": 1000, "num_threads": 2, "retired_knob": 1})
    _run(out, "sym", 2, 70.0, quant=rtn | {"symmetric": True})
    ours = _ours(make_report(out)).set_index("overrides")
    assert sorted(ours.index) == ["quant.symmetric=false", "quant.symmetric=true"]
    assert ours.loc["quant.symmetric=false", "n"] == 2 and ours.loc["quant.symmetric=false", "seeds"] == "0,1"


def test_result_config_walks_the_recorded_method_and_task_kind():
    from qspeech.report.experiments import result_config

    recorded = {"quant": {"method": "rtn", "symmetric": True, "log_every": 3, "gone": 1},
                "task": {"name": "asr_small", "kind": "asr", "lr": 0.1}, "cache_dir": "/x", "logger": {"name": "csv"},
                "model": {"name": "tiny_hubert", "trust_checkpoint": True}, "gone_top": 1, "seed": 2}
    assert result_config(recorded) == {"quant": {"method": "rtn", "symmetric": True},
                                       "task": {"name": "asr_small", "kind": "asr", "lr": 0.1},
                                       "model": {"name": "tiny_hubert"}, "seed": 2}
    # a method no longer known: the fields any method declares as result fields
    assert result_config({"quant": {"method": "old", "symmetric": False, "log_every": 1}}) == {
        "quant": {"method": "old", "symmetric": False}}


def test_quantized_rows_rise_against_the_full_precision_row_of_their_recipe(tmp_path):
    """An n_train sweep at 32 and 2 bits: each 2-bit row is compared with the 32-bit row of its own data size;
    the quantizer's own settings (unused at 32 bits) do not split the full-precision rows."""
    out = tmp_path / "outputs"
    _run(out, "fp800", 32, 50.0, n_train=800)
    _run(out, "fp800_bit", 32, 50.0, n_train=800, method="bit")  # quant=bit bits=32: the same experiment
    _run(out, "fp3000", 32, 40.0, n_train=3000)
    _run(out, "q800", 2, 60.0, n_train=800)
    _run(out, "q3000", 2, 60.0, n_train=3000)
    ours = _ours(make_report(out)).set_index(["bits", "overrides"])
    assert ours.loc[(32, "data.mini.n_train=800"), "n"] == 2
    assert ours.loc[(2, "data.mini.n_train=800"), "rise_pct"] == 20.0
    assert ours.loc[(2, "data.mini.n_train=3000"), "rise_pct"] == 50.0


def test_sweep_with_failures_lists_every_failed_job_with_its_error(tmp_path):
    """The issue's case: a 10-job sweep with 6 failures showed 1 ok row and 0 failed rows."""
    out = tmp_path / "outputs"
    for i, lr in enumerate([0.001, 0.002, 0.003, 0.004, 0.005]):
        for bits in (32, 2):
            ok = (i, bits) in {(0, 32), (0, 2), (1, 32), (2, 32)}
            _run(out, f"j{i}_{bits}", bits, 70.0 + i if ok else None, lr=lr)
    rep = make_report(out)
    ours = _ours(rep)
    assert len(ours) == 10 and (ours.status == "ok").sum() == 4 and (ours.status == "failed").sum() == 6
    failed = ours[ours.status == "failed"]
    assert all(failed.error.str.startswith("ValueError: job j")) and failed.overrides.str.startswith("task.lr=").all()
    md = rep["markdown"].read_text()
    assert md.count("- failed: tiny_hubert") == 6
    assert "- failed: tiny_hubert rtn 2-bit asr_small mini task.lr=0.005, seed 0: ValueError: job j4_2 exploded" in md
    assert rep["plot"].stat().st_size > 0


def test_smoke_and_random_init_runs_are_flagged(tmp_path):
    out = tmp_path / "outputs"
    _run(out, "real", 32, 60.0)
    _run(out, "smoke", 32, 99.0, max_steps=6)
    _run(out, "random", 32, 100.0, init="random")
    _run(out, "cli_smoke", 2, 99.0)  # flagged by its command line
    (out / "run" / "cli_smoke" / ".hydra").mkdir()
    (out / "run" / "cli_smoke" / ".hydra" / "overrides.yaml").write_text("- experiment=smoke\n- bits=2\n")
    ours = _ours(make_report(out))
    flags = {Path(d).name: f for d, f in zip(ours.run_dir, ours["flags"])}
    assert flags == {"real": "", "smoke": "smoke", "random": "random init", "cli_smoke": "smoke"}


def test_plot_labels_the_metric_unit_and_panels(tmp_path):
    from qspeech.report import plot
    from qspeech.report.plots import ylabel

    out = tmp_path / "outputs"
    _run(out, "fp", 32, 60.0)
    _run(out, "q", 2, 70.0)
    table = make_report(out)["table"]
    assert ylabel(table[table.source == "qspeech"]) == "WER (%)"
    import matplotlib.pyplot as plt

    titles = []
    orig = plt.Axes.set_title
    try:
        plt.Axes.set_title = lambda ax, t, **kw: (titles.append(t), orig(ax, t, **kw))[1]
        plot(table, tmp_path / "p.png")
    finally:
        plt.Axes.set_title = orig
    assert "Our runs: task asr_small, data mini" in titles
    assert any(t.startswith("Published (Yeh et al. 2023): task asr, data librispeech") for t in titles)


def test_report_refuses_a_missing_outputs_folder(tmp_path):
    from conftest import run_cli

    proc = run_cli("report", "--outputs", str(tmp_path / "nope"), cwd=tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "nope").exists()
    assert proc.stderr.strip().count("\n") == 0 and "nope: no such folder" in proc.stderr


def test_second_test_set_and_skipped_audio_columns(tmp_path):
    """metrics.eval (eval_data=...) becomes the eval_* columns, averaged over seeds; skipped audio is shown
    only where some was skipped."""
    out = tmp_path / "outputs"
    for seed, ev in enumerate([120.0, 124.0]):
        _run(out, f"fp_s{seed}", 32, 50.0 + seed, cer=17.0, seed=seed, eval_data={"name": "real_speech"})
        res = json.loads((out / "run" / f"fp_s{seed}" / "result.json").read_text())
        res["metrics"].update(eval={"data": "real_speech", "split": "test", "n": 100, "wer": ev, "cer": 70.0 + seed},
                              skipped_audio=seed)
        write_json_atomic(out / "run" / f"fp_s{seed}" / "result.json", res)
    rep = make_report(out)
    [row] = _ours(rep).to_dict("records")
    assert row["n"] == 2 and row["eval_data"] == "real_speech"
    assert row["eval_value"] == 122.0 and row["eval_cer"] == 70.5
    md = rep["markdown"].read_text()
    assert "eval_value" in md and "skipped_audio" in md


# ------------------------------------------------------------------ the SUPERB-style table
SUPERB_TASKS = {"pr_small": "per", "ks_small": "acc", "sid_small": "acc", "ic_small": "acc"}


def _superb_run(out, name, model, task, bits, value, quant="rtn", seed=0, chance=None, storage=None, status="ok"):
    metric = SUPERB_TASKS[task]
    storage = (0.0 if model == "fbank" else 10.0 * bits / 32 + 1) if storage is None else storage
    res = {"model": model, "init": "pretrained", "quant": quant, "targets": ["linear", "cnn"], "bits": bits,
           "task": task, "data": "mini", "status": status, "storage_mb": storage, "est_runtime": 0.2 + bits / 40,
           "finished": "2026-01-01T00:00:00",
           "config": {"model": {"name": model}, "quant": {"method": quant, "targets": ["linear", "cnn"]},
                      "task": {"name": task, "kind": task.split("_")[0]}, "data": {"name": "mini"},
                      "train": {"max_steps": 1500}, "bits": bits, "seed": seed}}
    if status == "ok":
        res |= {"metric": metric, "value": value,
                "metrics": {"metric": metric, "value": value, "higher_is_better": metric == "acc",
                            **({"majority_acc": chance} if chance is not None else {})}}
    else:
        res["error"] = f"DataError: {name} broke"
    write_json_atomic(out / "run" / name / "result.json", res)


def _superb_outputs(tmp_path):
    """The suite's shape: tiny_hubert at 32/2/1 bits (rtn and bit), tiny_distilhubert and FBANK, four tasks."""
    out = tmp_path / "outputs"
    values = {  # task -> (fp, rtn2, bit2, rtn1, bit1, distil, fbank)
        "pr_small": (20.0, 30.0, 25.0, 60.0, 40.0, 24.0, 50.0),
        "ks_small": (95.0, 80.0, 90.0, 40.0, 70.0, 93.0, 60.0),
        "sid_small": (70.0, 50.0, 60.0, 10.0, 30.0, 65.0, 20.0),
        "ic_small": (80.0, 60.0, 70.0, 20.0, 50.0, 75.0, 30.0),
    }
    chance = {"pr_small": None, "ks_small": 8.33, "sid_small": 2.5, "ic_small": 3.75}
    for task, (fp, r2, b2, r1, b1, distil, fbank) in values.items():
        c = chance[task]
        _superb_run(out, f"fp_{task}", "tiny_hubert", task, 32, fp, chance=c)
        _superb_run(out, f"rtn2_{task}", "tiny_hubert", task, 2, r2, chance=c)
        _superb_run(out, f"bit2_{task}", "tiny_hubert", task, 2, b2, quant="bit", chance=c)
        _superb_run(out, f"rtn1_{task}", "tiny_hubert", task, 1, r1, chance=c)
        _superb_run(out, f"bit1_{task}", "tiny_hubert", task, 1, b1, quant="bit", chance=c)
        _superb_run(out, f"distil_{task}", "tiny_distilhubert", task, 32, distil, storage=4.28, chance=c)
        _superb_run(out, f"fbank_{task}", "fbank", task, 32, fbank, chance=c)
    return out


def test_superb_table_has_a_column_per_task_and_a_row_per_upstream_method_bits(tmp_path):
    out = _superb_outputs(tmp_path)
    _superb_run(out, "fp_ks_seed1", "tiny_hubert", "ks_small", 32, 97.0, seed=1, chance=8.33)  # a second seed
    rep = make_report(out)
    sup = pd.read_csv(rep["superb_csv"])
    # rows: the teacher at 32, 2, 1 bits (fp first, then rtn/bit by name), then DistilHuBERT, then FBANK
    assert list(zip(sup.model, sup.quant, sup.bits)) == [
        ("tiny_hubert", "fp", 32), ("tiny_hubert", "bit[linear+cnn]", 2), ("tiny_hubert", "rtn[linear+cnn]", 2),
        ("tiny_hubert", "bit[linear+cnn]", 1), ("tiny_hubert", "rtn[linear+cnn]", 1),
        ("tiny_distilhubert", "fp", 32), ("fbank", "fp", 32)]
    tasks = [c[: -len(".value")] for c in sup.columns if c.endswith(".value")]
    assert tasks == ["pr_small", "ks_small", "ic_small", "sid_small"]  # SUPERB's order: PR, KS, IC, SID
    by = sup.set_index(["model", "quant", "bits"])
    assert by.loc[("tiny_hubert", "bit[linear+cnn]", 1), "pr_small.value"] == 40.0
    assert by.loc[("tiny_hubert", "rtn[linear+cnn]", 2), "sid_small.value"] == 50.0
    assert by.loc[("fbank", "fp", 32), "ic_small.value"] == 30.0 and by.loc[("fbank", "fp", 32), "storage_mb"] == 0
    assert by.loc[("tiny_distilhubert", "fp", 32), "storage_mb"] == 4.28
    fp = by.loc[("tiny_hubert", "fp", 32)]
    assert fp["ks_small.value"] == 96.0 and fp["ks_small.value_std"] == pytest.approx(2 ** 0.5) and fp["ks_small.n"] == 2
    assert fp["pr_small.n"] == 1 and fp["storage_mb"] == 11.0 and fp["est_runtime"] == pytest.approx(1.0)
    assert fp["pr_small.metric"] == "per" and not fp["pr_small.higher_is_better"] and fp["ks_small.higher_is_better"]
    assert fp["ks_small.chance"] == 8.33 and pd.isna(fp["pr_small.chance"])

    md = rep["markdown"].read_text()
    section = md[md.index("## SUPERB tasks"):]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
             if line.startswith("| ")]
    assert cells[0][-4:] == ["pr_small PER % ↓", "ks_small ACC % ↑", "ic_small ACC % ↑", "sid_small ACC % ↑"]
    assert cells[1][:3] == ["tiny_hubert", "fp", "32"]
    assert cells[1][-4:] == ["20.00", "96.00 ± 1.41 (n=2)", "80.00", "70.00"]
    assert cells[-2][:3] == ["fbank", "fp", "32"]
    assert cells[-1][0] == "chance (majority class)" and cells[-1][-4:] == ["", "8.33", "3.75", "2.50"]
    assert "## Our runs" in md  # the main table is still there, before it
    assert rep["superb_plot"] is not None and rep["superb_plot"].stat().st_size > 0


def test_superb_table_marks_tasks_that_only_failed_and_lists_nothing_for_asr_alone(tmp_path):
    out = tmp_path / "outputs"
    _superb_run(out, "fp_ks", "tiny_hubert", "ks_small", 32, 95.0, chance=8.33)
    _superb_run(out, "fp_pr", "tiny_hubert", "pr_small", 32, None, status="failed")
    _superb_run(out, "q_pr", "tiny_hubert", "pr_small", 2, 30.0)
    _superb_run(out, "q_pr_failed_again", "tiny_hubert", "ks_small", 2, None, status="failed")
    sup = make_report(out)["superb"].set_index("bits")
    assert sup.loc[32, "pr_small.status"] == "failed" and pd.isna(sup.loc[32, "pr_small.value"])
    assert sup.loc[32, "ks_small.status"] == "ok" and sup.loc[2, "ks_small.status"] == "failed"
    assert sup.loc[2, "pr_small.value"] == 30.0

    asr_only = tmp_path / "asr"
    write_json_atomic(asr_only / "r1" / "result.json", _result("tiny_hubert", 32, 20.0))
    write_json_atomic(asr_only / "r2" / "result.json", _result("tiny_hubert", 2, 40.0))
    rep = make_report(asr_only)
    assert rep["superb"].empty and rep["superb_csv"] is None and rep["superb_plot"] is None
    assert "## SUPERB tasks" not in rep["markdown"].read_text() and not (asr_only / "superb.csv").exists()


def test_superb_plot_has_a_row_per_task_with_its_metric_and_chance_line(tmp_path):
    from qspeech.report import plot_superb

    table = make_report(_superb_outputs(tmp_path))["table"]
    import matplotlib.pyplot as plt

    titles, lines = [], []
    orig_title, orig_hline = plt.Axes.set_title, plt.Axes.axhline
    try:
        plt.Axes.set_title = lambda ax, t, **kw: (titles.append(t), orig_title(ax, t, **kw))[1]
        plt.Axes.axhline = lambda ax, y=0, **kw: (lines.append((y, kw.get("label"))), orig_hline(ax, y, **kw))[1]
        plot_superb(table, tmp_path / "s.png")
    finally:
        plt.Axes.set_title, plt.Axes.axhline = orig_title, orig_hline
    assert titles[::2] == ["task pr_small, data mini: PER (%) (lower is better)",
                           "task ks_small, data mini: ACC (%) (higher is better)",
                           "task ic_small, data mini: ACC (%) (higher is better)",
                           "task sid_small, data mini: ACC (%) (higher is better)"]
    chance = sorted({y for y, label in lines if label == "chance (majority class)"})
    assert chance == [2.5, 3.75, 8.33]
    assert sorted({y for y, label in lines if label == "fbank (no upstream)"}) == [20.0, 30.0, 50.0, 60.0]


def test_the_distilled_comparison_comes_from_the_paper_mapping():
    from qspeech import paper

    assert [paper.student_of(m) for m in ("tiny_hubert", "tiny_distilhubert", "hubert", "wavlm")] == [
        "tiny_distilhubert", "tiny_distilhubert", "distilhubert", "distilhubert"]
    assert [paper.teacher_of(m) for m in ("tiny_distilhubert", "distilhubert", "wavlm")] == [
        "tiny_hubert", "hubert", "wavlm"]


def test_a_sweep_still_running_shows_its_running_and_stopped_jobs(tmp_path):
    """A job in progress (its run lock names a live process) and one killed before its result (a dead holder)
    are listed beside the finished and failed ones; a job that exited cleanly names no holder."""
    import os
    import socket
    import subprocess
    import sys

    from qspeech.atomic import LOCK_FILE

    out = tmp_path / "outputs"
    _run(out, "done", 32, 60.0)
    _run(out, "broken", 2, None)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for name, pid in (("live", os.getpid()), ("killed", int(dead.stdout))):
        (out / "run" / name).mkdir(parents=True)
        (out / "run" / name / LOCK_FILE).write_text(f"{pid} {socket.gethostname()} 2026-12-08T04:00:00\n")
    (out / "run" / "clean").mkdir()
    (out / "run" / "clean" / LOCK_FILE).write_text("")
    rep = make_report(out)
    assert [(Path(f).name, s) for f, s, _ in rep["pending"]] == [("killed", "stopped"), ("live", "running")]
    md = Path(rep["markdown"]).read_text()
    assert "## Runs without a result yet" in md and f"running: {out / 'run' / 'live'} (pid {os.getpid()}" in md
    assert "rerun its command to resume" in md and "- failed:" in md and rep["runs"] == 2
