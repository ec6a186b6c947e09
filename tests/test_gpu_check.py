"""benchmarks/gpu_check.py runs where no GPU is: its CPU dry run goes through the same training and bench
code, so the prepared check cannot rot between the sessions that have a GPU."""

import importlib.util
import json
import zipfile

import pytest
import torch

from conftest import ROOT


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_dry_run_writes_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    _script().main(["--device", "cpu", "--model", "tiny_hubert", "--task", "asr_small", "--steps", "2",
                    "--n-train", "8", "--n-eval", "2", "--batch", "1", "--seconds", "1", "--repeats", "1",
                    "--warmup", "0", "--qat-steps", "2", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["env"]["device"] == "cpu" and r["env"]["torch"] == torch.__version__
    t = r["train"]
    assert t["returncode"] == 0, t.get("error")
    assert t["result"]["status"] == "ok" and t["result"]["metrics"]["steps"] == 2
    assert t["result"]["metrics"]["device"] == "cpu" and t["steps_per_s"] > 0
    v = r["bench"]["variants"]
    assert v["fp32"]["max_abs_err"] == 0.0 and v["fp32"]["speedup_vs_fp32"] == 1.0
    assert 0 < v["bf16_model"]["max_abs_err"] < 1.0  # bf16 rounding, not a different model
    assert "fp16_model" not in v  # CUDA-only rows are not tried on the CPU
    q = r["qat"]
    assert q["steps"] == 2 and q["s_per_step"] > 0 and q["loss_first"] > 0, q
    lstm = r["lstm"]
    assert lstm["max_abs_diff"] < 1e-4 and lstm["fused_dtype_under_bf16_autocast"] == "torch.float32", lstm
    assert "skipped" in r["ddp"] or r["ddp"]["returncode"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_no_cuda_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        _script().main(["--out", "/nonexistent/x.json"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and len(err.splitlines()) == 1


def test_wheel_slimming_keeps_record_consistent(tmp_path):
    src, dst = tmp_path / "w-1.0-py3-none-any.whl", tmp_path / "slim.whl"
    files = {"w/__init__.py": b"x = 1\n", "w/data/large_en.msgpack.gz": b"en", "w/data/large_de.msgpack.gz": b"de"}
    record = "".join(f"{n},sha256=abc,2\n" for n in files) + "w-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(src, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
        z.writestr("w-1.0.dist-info/RECORD", record)
    _script()._keep_only(src, dst, lambda n: not n.startswith("w/data/") or n.endswith("_en.msgpack.gz"))
    with zipfile.ZipFile(dst) as z:
        assert sorted(z.namelist()) == ["w-1.0.dist-info/RECORD", "w/__init__.py", "w/data/large_en.msgpack.gz"]
        rec = z.read("w-1.0.dist-info/RECORD").decode()
    assert "large_de" not in rec and "large_en" in rec and "RECORD" in rec
