"""`pip install .` gives a working tool: the wheel carries conf/ (as qspeech/conf) and the assets, and the
installed command runs `qspeech cost` and `qspeech run experiment=smoke` from a folder without the checkout."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv", "outputs", "multirun", "build", "dist", "*.egg-info", "__pycache__",
                              ".pytest_cache", ".cache")


def _sh(*cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the checkout (a build leaves nothing in the work tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    _sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src)
    [whl] = (tmp / "dist").glob("qspeech-*.whl")
    return whl


def _venv(path: Path) -> Path:
    _sh(sys.executable, "-m", "venv", "--without-pip", path)
    return path / "bin" / "python"


def _check_installed(python: Path, work: Path, env: dict) -> None:
    where = _sh(python, "-c", "import qspeech.config as c; print(c.CONF_DIR)", cwd=work, env=env).stdout.strip()
    assert where.startswith(str(python.parent.parent)) and where.endswith("qspeech/conf")
    exe = python.parent / "qspeech"
    _sh(exe, "cost", "model=hubert", "bits=2", "cost.seconds=1", cwd=work, env=env)
    [cost] = (work / "outputs" / "cost").rglob("cost.json")
    assert json.loads(cost.read_text())["params"] == 94_371_712
    _sh(exe, "run", "experiment=smoke", "train.num_threads=1", cwd=work, env=env)
    [result] = (work / "outputs" / "run").rglob("result.json")
    assert json.loads(result.read_text())["status"] == "ok" and (result.parent / "qspeech.log").exists()
    assert "qspeech run" in _sh(python, "-m", "qspeech", "--help", cwd=work, env=env).stdout


def test_wheel_ships_conf_and_assets(wheel):
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for yaml in (p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml")):
        assert f"qspeech/conf/{yaml.as_posix()}" in names
    assert {"qspeech/assets/tiny_hubert.pt", "qspeech/assets/tiny_distilhubert.ckpt"} <= names
    assert "qspeech/report/__init__.py" in names  # subpackages are found, not listed


def test_wheel_in_a_fresh_venv_runs(wheel, tmp_path):
    """A fresh venv that sees this environment's packages (torch, s3prl, ...) through a .pth line, so pip
    finds every dependency installed and needs no download; the wheel's own qspeech comes first."""
    python = _venv(tmp_path / "venv")
    site = _sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh(sys.executable, "-m", "pip", "--python", python, "install", "-q", wheel)
    work = tmp_path / "work"
    work.mkdir()
    _check_installed(python, work, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                        "QSPEECH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_readme_pip_install_in_a_bare_venv(wheel, tmp_path):
    """The README's plain pip path, from nothing: torch pinned, s3prl without its torchaudio pin, the wheel."""
    python = _venv(tmp_path / "venv")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q"]
    _sh(*pip, "torch==2.13.0")
    _sh(*pip, "--no-deps", "s3prl==0.4.18")
    _sh(*pip, wheel)
    work = tmp_path / "work"
    work.mkdir()
    _check_installed(python, work, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                        "QSPEECH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
