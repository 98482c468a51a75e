# koala-distill: every target creates .venv and installs the project into it when it is missing or stale.
# torch is pinned to the CPU build this machine keeps on disk; on a GPU machine pass TORCH="torch==2.13.0"
# with the matching index, or install torch first and use TORCH=torch.

PYTHON ?= python3.11
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help venv test test-fast lint demo demo-data tiny inspect data latents sample eval \
        bench-data bench-train bench-infer clean

help:
	@echo "make demo | test | test-fast | lint | inspect | tiny | demo-data | data SRC=.. OUT=.. | latents |"
	@echo "     sample | eval | bench-data | bench-train | bench-infer | clean"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)  ## the whole suite (gpu tests skip without CUDA)
	WANDB_MODE=offline $(PY) -m pytest -q

test-fast: $(STAMP)  ## without the slow tests
	WANDB_MODE=offline $(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

inspect: $(STAMP)  ## e.g. make inspect ARGS="student=koala_700m teacher=sdxl_base"
	$(PY) scripts/inspect_student.py $(or $(ARGS),student=koala_1b teacher=sdxl_base)

tiny: $(STAMP)  ## build (or reuse) the tiny SDXL pipeline in outputs/tiny_sdxl
	$(PY) scripts/make_tiny_pipeline.py --out outputs/tiny_sdxl

demo-data: $(STAMP)  ## scikit-image photos with written captions -> outputs/demo_data/*.tar
	$(PY) scripts/make_demo_data.py --out outputs/demo_data

demo: $(STAMP) demo-data tiny  ## distill the tiny student on the CPU, export it, print one JSON line
	WANDB_MODE=offline $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no train/main.py +experiment=demo $(ARGS)

clean:
	rm -rf runs outputs .pytest_cache .ruff_cache
