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

.PHONY: help venv test test-fast lint demo demo-data tiny inspect train data latents export sample eval \
        bench-data bench-train bench-infer plan-memory clean

help:
	@echo "make demo | test | test-fast | lint | inspect | train ARGS=.. [GPUS=N LAUNCH=..] | tiny | demo-data |"
	@echo "     data SRC=.. OUT=.. | latents |"
	@echo "     export CKPT=.. OUT=.. | sample | eval | bench-data | bench-train | bench-infer | plan-memory | clean"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)  ## the whole suite (gpu tests skip without CUDA)
	WANDB_MODE=offline $(PY) -m pytest -q --durations=15

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

# The demo starts over each time (its run folder, runs/demo unless ARGS names another, is the demo's own scratch),
# unless ARGS continues it with train.resume=...
DEMO_DIR = $(or $(patsubst train.output_dir=%,%,$(filter train.output_dir=%,$(ARGS))),runs/demo)
demo: $(STAMP) demo-data tiny  ## distill the tiny student on the CPU, export it, print one JSON line
	@if [ -z "$(filter train.resume=%,$(ARGS))" ] && [ -d "$(DEMO_DIR)/checkpoints" ]; then \
		echo "make demo starts over: removing the previous demo run $(DEMO_DIR)"; rm -rf "$(DEMO_DIR)"; fi
	@$(PY) train/main.py --check +experiment=demo $(ARGS)
	WANDB_MODE=offline $(VENV)/bin/accelerate launch --quiet --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no train/main.py +experiment=demo $(ARGS)

# The config is checked once before `accelerate launch` (one line on error): the launcher would follow a failed
# rank's line with its own traceback. GPUS=N is the process count of both (default: the GPUs nvidia-smi lists, else
# 1; it overrides num_processes of a LAUNCH config file); LAUNCH adds launcher flags.
GPUS_FOUND = $(shell n=$$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); [ "$${n:-0}" -gt 0 ] && echo $$n || echo 1)
train: $(STAMP)  ## make train ARGS="+experiment=koala_1b teacher.path=.. data.shards=.." [GPUS=8] [LAUNCH="--config_file conf/accelerate/deepspeed_zero2.yaml"]
	@test -n "$(ARGS)" || { echo "usage: make train ARGS=\"+experiment=... key=value ...\" [GPUS=N] [LAUNCH=...]"; exit 2; }
	@WORLD_SIZE=$(or $(GPUS),$(GPUS_FOUND)) $(PY) train/main.py --check $(ARGS)
	$(VENV)/bin/accelerate launch --quiet --num_processes $(or $(GPUS),$(GPUS_FOUND)) $(LAUNCH) train/main.py $(ARGS)

data: $(STAMP)  ## make data SRC=images/|manifest.parquet|img2dataset_out/ OUT=shards/ [ARGS="--min-side 1024"]
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make data SRC=... OUT=... [ARGS=...]"; exit 2; }
	$(PY) scripts/prep_data.py --src "$(SRC)" --out "$(OUT)" $(ARGS)

# The tiny pipeline and the demo shards are built only when they are the defaults used.
latents: $(STAMP) $(if $(PIPELINE),,tiny) $(if $(SHARDS),,demo-data)  ## defaults: the tiny teacher on the demo shards at 64 px
	$(PY) scripts/make_latents.py --pipeline "$(or $(PIPELINE),outputs/tiny_sdxl)" \
		--shards "$(or $(SHARDS),outputs/demo_data)" --out "$(or $(OUT),outputs/demo_latents)" \
		$(or $(ARGS),--batch-size 4)

export: $(STAMP)  ## make export CKPT=runs/x/checkpoints/step_N OUT=exports/x [ARGS="--weights live --dtype fp16"]
	@test -n "$(CKPT)" -a -n "$(OUT)" || { echo "usage: make export CKPT=... OUT=... [ARGS=...]"; exit 2; }
	$(PY) scripts/export.py --checkpoint "$(CKPT)" --out "$(OUT)" $(ARGS)

sample: $(STAMP) tiny  ## images + grid, e.g. ARGS="--source runs/demo/export --prompts smoke"
	$(PY) scripts/sample.py $(or $(ARGS),--source outputs/tiny_sdxl --prompts smoke --out outputs/samples)

eval: $(STAMP) tiny  ## e.g. ARGS="student=runs/demo/export teacher=outputs/tiny_sdxl prompts=eval clip_model=/models/clip" (teacher=auto needs a checkpoint student)
	WANDB_MODE=$(or $(WANDB_MODE),offline) $(PY) scripts/eval.py \
		$(or $(ARGS),student=outputs/tiny_sdxl teacher=outputs/tiny_sdxl prompts=smoke out_dir=outputs/eval)

bench-data: $(STAMP)  ## loader throughput per worker (JSON)
	$(PY) scripts/bench_data.py $(ARGS)

bench-infer: $(STAMP)  ## model-card latency table (tiny shapes without a GPU); ARGS="--fast" for every switch
	$(PY) scripts/bench_infer.py $(ARGS)

bench-train: $(STAMP)  ## training-step img/s, MFU, peak memory (JSON; tiny shapes without a GPU); ARGS="--compare-plain"
	$(PY) scripts/bench_train.py $(ARGS)

plan-memory: $(STAMP)  ## one GPU's peak training memory, estimated on the CPU; ARGS="+experiment=koala_1b train.micro_batch_size=16"
	$(PY) scripts/estimate_memory.py $(or $(ARGS),+experiment=koala_1b)

clean:  ## the demo's files and tool caches; training runs (runs/<experiment>), evals and benchmark results stay
	rm -rf runs/demo outputs/tiny_sdxl outputs/demo_data .pytest_cache .ruff_cache
