"""The real console script on tiny configs: help, cost, clear errors with exit code 2."""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli


def _one_error_line(proc):
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("qspeech: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_help_lists_subcommands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("run", "cost", "report", "data", "pretrain", "distill", "demo"):
        assert f"  {cmd} " in proc.stdout


def test_run_help_and_cfg_job_are_hydra():
    proc = run_cli("run", "--help")
    assert proc.returncode == 0 and "== Config ==" in proc.stdout
    proc = run_cli("run", "--cfg", "job", "model=distilhubert", "bits=4")
    assert proc.returncode == 0, proc.stderr
    assert "name: distilhubert" in proc.stdout and "bits: 4" in proc.stdout


def test_hydra_flags_may_follow_the_overrides():
    proc = run_cli("run", "experiment=smoke", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 6" in proc.stdout and "command: run" in proc.stdout
    proc = run_cli("run", "bits=4", "--cfg", "job", "model=distilhubert")
    assert proc.returncode == 0, proc.stderr
    assert "name: distilhubert" in proc.stdout and "bits: 4" in proc.stdout


@pytest.mark.parametrize("args,needle", [
    (["bits=0"], "bits=0 is not supported"),
    (["bits=5"], "bits=5 is not supported"),
    (["model=nope"], "model=nope: no such option"),
    (["-m", "bits=2,5"], "bits=5 is not supported"),
    (["nosuchkey=1"], "nosuchkey"),
    (["cost.seconds=-1"], "cost.seconds"),
    (["quant=bit", "bits=4"], "bit"),
    (["quant=lsq", "bits=1"], "lsq"),
    (["quant.targets=[linear,nope]"], "nope"),
    # wrong types and values name the key (the cases)
    (["experiment=smoke", "seed=abc"], "seed=abc: must be an integer"),
    (["train.max_steps=abc"], "train.max_steps=abc: must be an integer"),
    (["train.max_steps=-1"], "train.max_steps=-1: must be an integer >= 1"),
    (["train.batch_size=2.5"], "train.batch_size=2.5: must be an integer"),
    (["quant.targets=linear"], "quant.targets=linear: must be a list, e.g. quant.targets=[linear]"),
    (["train.nope=1"], "train.nope: unknown key"),
    (["+train.nope=1"], "train.nope: unknown key"),
    (["data.mini.n_train=-3"], "data.mini.n_train=-3"),
    (["-m", "train.max_steps=5,-2"], "train.max_steps=-2"),
    (["experiment=smoke", "--cfg", "job", "seed=abc"], "seed=abc"),
])
def test_bad_values_one_line_exit_2(tmp_path, args, needle):
    line = _one_error_line(run_cli("run", *args, cwd=tmp_path))
    assert needle in line
    assert not (tmp_path / "outputs").exists()  # checked before Hydra makes a run folder


@pytest.mark.parametrize("command,args,needle", [
    ("pretrain", ["pretrain.iterations=[{targets: hidden, layer: 2, clusters: 10, steps: 5}]"],
     "pretrain.iterations[0].targets=hidden"),
    ("pretrain", ["pretrain.batch_size=0"], "pretrain.batch_size=0: must be an integer >= 1"),
    ("distill", ["distill.optim.lr=abc"], "distill.optim.lr=abc: must be a number"),
    ("distill", ["model=tiny_hubert"], "model.arch=hubert"),
    ("cost", ["bench.repeats=0"], "bench.repeats=0"),
])
def test_other_commands_check_their_config(tmp_path, command, args, needle):
    line = _one_error_line(run_cli(command, *args, cwd=tmp_path))
    assert needle in line
    assert not (tmp_path / "outputs").exists()


def test_cost_hubert_counts_and_writes_cost_json(tmp_path):
    proc = run_cli("cost", "model=hubert", "bits=2", "cost.seconds=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cost_files = list((tmp_path / "outputs" / "cost").rglob("cost.json"))
    assert len(cost_files) == 1
    cost = json.loads(cost_files[0].read_text())
    assert cost["params"] == 94_371_712 and cost["quantized_params"] == 84_934_656
    assert {"params", "quantized_params", "storage_mb", "est_runtime", "macs", "modules"} <= cost.keys()
    assert "encoder.layers.11.fc2" in proc.stdout and "storage" in proc.stdout


def test_corrupt_checkpoint_exit_2(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    line = _one_error_line(run_cli("run", "model=tiny_hubert", f"model.ckpt={bad}", cwd=tmp_path))
    assert "corrupt" in line and str(bad) in line


def test_offline_hubert_run_is_a_clear_error_and_a_failed_result(tmp_path):
    proc = run_cli("run", "model=hubert", "bits=2", "task=asr", "data.root=/nonexistent",
                   "model.url=http://127.0.0.1:9/hubert_base_ls960.pt", cwd=tmp_path)
    line = _one_error_line(proc)
    assert "http://127.0.0.1:9/hubert_base_ls960.pt" in line or "data.root" in line


def test_python_dash_m_is_the_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "qspeech", "run", "experiment=smoke", "seed=abc"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "seed=abc" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------ Hydra's flags, help, completion, names
def test_flags_after_overrides_cost_cfg_job():
    proc = run_cli("cost", "model=hubert", "bits=2", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "name: hubert" in proc.stdout and "bits: 2" in proc.stdout


def test_multirun_flag_last_in_launcher_workers_that_stay_quiet(tmp_path):
    """`-m` after the overrides, jobs in joblib's worker processes: each job runs, is named qspeech and logs
    to its qspeech.log, and no s3prl INFO dump reaches the console."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = run_cli("cost", "experiment=smoke", "cost.seconds=1", "bits=2,4", "hydra/launcher=joblib",
                   "hydra.launcher.n_jobs=2", "-m", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    costs = sorted((tmp_path / "outputs" / "cost").rglob("cost.json"))
    assert sorted(json.loads(p.read_text())["bits"] for p in costs) == [2, 4]
    assert "HubertModel Config" not in proc.stdout + proc.stderr
    for p in costs:
        assert "cost.json" in (p.parent / "qspeech.log").read_text() and not (p.parent / "cli.log").exists()


def test_run_help_is_qspeech_without_schema_entries():
    proc = run_cli("run", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("qspeech run") and "is powered by Hydra" not in proc.stdout
    assert "_schema" not in proc.stdout
    assert "logger: csv, mlflow, tensorboard" in proc.stdout and "quant: bit, bit_exact, kmeans, lsq, rtn" in proc.stdout


def test_bash_completion_script_completes_commands_and_overrides(tmp_path):
    import os
    import shutil
    import sys
    from pathlib import Path

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = run_cli("run", "-sc", "install=bash")
    assert script.returncode == 0, script.stderr
    assert script.stdout.rstrip().endswith("-F hydra_bash_completion qspeech")  # one program, not `qspeech run`
    (tmp_path / "complete.sh").write_text(script.stdout)
    # what bash does on <TAB>: the registered function, with the line in COMP_LINE / COMP_WORDS
    driver = """source complete.sh
comp() { COMP_LINE="$1"; COMP_POINT=${#1}; read -ra COMP_WORDS <<< "$1"
         [[ "$1" == *" " ]] && COMP_WORDS+=(""); COMP_CWORD=$((${#COMP_WORDS[@]}-1))
         hydra_bash_completion; echo "$1|${COMPREPLY[*]}"; }
comp "qspeech ru"
comp "qspeech run model=tiny"
comp "qspeech cost quant=r"
"""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", driver], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    replies = dict(line.split("|", 1) for line in out.stdout.splitlines() if "|" in line)
    assert replies["qspeech ru"] == "run", out.stderr
    assert replies["qspeech run model=tiny"].split() == ["model=tiny_distilhubert", "model=tiny_hubert"]
    assert replies["qspeech cost quant=r"] == "quant=rtn"


def test_missing_s3prl_is_one_line_naming_the_install_command(tmp_path):
    import os

    fake = tmp_path / "site" / "s3prl"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 's3prl'\", name='s3prl')\n")
    env = {"PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    line = _one_error_line(run_cli("cost", "model=tiny_hubert", cwd=tmp_path, env=env))
    assert "s3prl is not installed" in line and "pip install --no-deps s3prl==0.4.18" in line


def test_demo_jobs_add_seeds_of_the_seeded_rows_and_the_real_speech_set():
    from qspeech.demo import EXTRA, SEEDED, STUDY, jobs

    one = jobs(1, real_speech=False)
    assert one == [r for r in STUDY if r[0] not in EXTRA] and len(one) == len(STUDY) - 2
    assert jobs(1, real_speech=False, all_rows=True) == list(STUDY)
    three = jobs(3, real_speech=True)
    assert len(three) == len(one) + 2 * sum(label in SEEDED for label, _ in STUDY)
    extra = {label: ov for label, ov in three[len(one):]}
    assert extra["tiny_hubert rtn 2-bit seed 2"] == ["quant=rtn", "bits=2", "seed=2", "eval_data=real_speech"]
    assert all(ov[-1] == "eval_data=real_speech" for _, ov in three)
    assert not any(label.startswith("fbank") and "seed" in label for label, _ in three)


def test_demo_runs_the_longest_jobs_first_qat_1_bit_after_2_bit_and_extra_seeds_last():
    from qspeech.demo import _longest_first, jobs

    order = [label for label, _ in sorted(jobs(2, real_speech=False), key=_longest_first)]
    # QAT 2-bit first; QAT 1-bit not beside it (its first stage is the 2-bit row's student, from the cache)
    assert order[:2] == ["tiny_hubert bit (QAT) 2-bit", "tiny_hubert full precision"]
    assert order.index("tiny_hubert bit (QAT) 1-bit") > 2
    firsts = [label for label in order if " seed " not in label]
    assert firsts[-1] == "fbank (no upstream)" and order[len(firsts):] == [
        "tiny_hubert bit (QAT) 2-bit seed 1", "tiny_hubert full precision seed 1",
        "tiny_hubert rtn 2-bit seed 1", "tiny_hubert bit (QAT) 1-bit seed 1"]


def test_demo_job_logs_are_appended_not_replaced(tmp_path):
    """A rerun of `qspeech demo` finds finished jobs in seconds; their logs must keep the run that did the work."""
    from qspeech.demo import _run_job

    for _ in range(2):
        label, rc, _, log = _run_job("a job (x)", ["--help"], tmp_path, threads=1)
        assert rc == 0 and log == tmp_path / "a_job_x.log"
    text = log.read_text()
    assert text.count("--help hydra/job_logging=none") == 2 and text.count("usage") >= 2


def test_demo_searches_compose_on_the_demo_corpus(tmp_path):
    """Each mixed-precision row runs a plan that one of the demo's searches writes, and each search composes
    (typed) on the demo's own corpus and quantized modules."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import qspeech.search.config  # noqa: F401 - registers the search schema
    from qspeech.config import to_typed
    from qspeech.demo import SEARCHED, SEARCHES, STUDY, jobs, search_commands

    planned = {o.split("=", 1)[1] for _, ov in SEARCHED for o in ov if o.startswith("+quant_plan=")}
    assert planned == set(SEARCHES)
    assert jobs(1, False, search=True, all_rows=True) == STUDY + SEARCHED
    assert len(jobs(3, False, search=True, all_rows=True)) == len(STUDY) + 14
    demo = OmegaConf.load("conf/experiment/demo.yaml")
    with initialize_config_dir(config_dir=str(Path("conf").resolve()), version_base="1.3"):
        for name, args in search_commands(tmp_path):
            assert args[0] == "search" and args[-1] == f"hydra.run.dir={tmp_path / 'search' / name}"
            cfg = compose("search", overrides=args[1:-1])
            assert cfg.data.mini.vocab_size == demo.data.mini.vocab_size
            assert list(cfg.quant.targets) == list(demo.quant.targets) and cfg.budget_bits == 2
            assert to_typed(cfg).budget_bits == 2  # every value checked by the search schema
