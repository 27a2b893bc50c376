# Every target builds .venv itself on a fresh clone: `make train` and `make test` are the whole set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint train seed compile-time clean bench-ckpt generate \
	bench-inference strategies bench-attention bench bench-gpu scaling bench-convert flax-model \
	local-sgd bench-gemm

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The tests also need the interop extra (torch CPU, transformers, safetensors): only they pay
# for it, not `make train`.
INTEROP := $(VENV)/.installed-interop

$(INTEROP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,interop]'
	touch $(INTEROP)

# Two workers, one test file each at a time (module fixtures share compiles within a file): XLA
# compiles on one thread, so on CI's 2 cores this halves the suite's wall time.
TEST_WORKERS ?= 2

test: $(INTEROP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(INTEROP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check spmd tests experiments
	$(PY) -m ruff format --check spmd tests experiments

# The main job: gpt-small on the Python standard library's source, FSDP x TP over 8 simulated CPU devices.
# A fresh run each time (its old checkpoints go); Ctrl-C saves and prints the resume command.
train: $(STAMP)
	rm -rf runs/train/ckpt
	$(VENV)/bin/spmd train --model gpt-small --devices 8 --mesh fsdp=4,tensor=2 \
		--steps 100 --batch 16 --seq 128 --lr 3e-3 --metrics-file runs/train/metrics.jsonl \
		--ckpt-dir runs/train/ckpt --ckpt-every 50

seed: $(STAMP)
	$(PY) -m experiments.seed_mirrored

compile-time: $(STAMP)
	$(PY) -m experiments.compile_time

clean:
	rm -rf $(VENV) runs .pytest_cache

# What an async checkpoint save blocks the loop for, against a sync one (gpt-small, 8 CPU devices).
bench-ckpt: $(STAMP)
	$(PY) -m experiments.ckpt_cost

# Complete "def " with the checkpoint `make train` writes (sampled; --temperature 0 is greedy).
generate: $(STAMP)
	$(VENV)/bin/spmd generate --ckpt-dir runs/train/ckpt --prompt "def "

# Prefill and decode tokens/s and achieved memory bandwidth, gpt-small, batches 1, 8 and 32.
bench-inference: $(STAMP)
	$(PY) -m experiments.inference --model gpt-small --batches 1,8,32

# Five layouts of gpt-small on 8 simulated CPU devices: compiler report vs measured step time.
strategies: $(STAMP)
	$(PY) -m experiments.strategies

# Forward + backward time of each attention implementation on this machine (picks the CPU default).
bench-attention: $(STAMP)
	$(PY) -m experiments.attention

# spmd's train step against a careful plain-JAX step and PyTorch eager (when torch is installed):
# tokens/s, ratios, peak RSS on one CPU device, for the issue's CPU case and gpt-small.
bench: $(STAMP)
	$(PY) -m experiments.bench

# float32 GEMM GFLOP/s of XLA against PyTorch at gpt-small's dense-layer shapes (torch when
# installed): the ceiling XLA:CPU's matmuls put on `make bench`'s spmd/torch ratio.
bench-gemm: $(STAMP)
	$(PY) -m experiments.gemm

# The GPU table (gpt-1b and the Llama-7B shape at 8 layers, remat dots/none, bf16, seq 2048) on
# one accelerator: measured step, TFLOP/s, MFU and peak memory beside the compiler's prediction.
# Writes experiments/results/gpu.jsonl and gpu.md. No $(STAMP): a GPU machine may have no network,
# so this uses .venv if there is one, else $(PYTHON), which needs JAX with CUDA, flax and optax.
bench-gpu:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m experiments.gpu

# gpt-small (fsdp=N) on 1, 2, 4, 8 simulated CPU devices: strong and weak scaling, measured vs predicted.
scaling: $(STAMP)
	$(PY) -m experiments.scaling

# Time and peak host memory of `spmd convert` each way for a random gpt-350m-shaped Llama.
bench-convert: $(INTEROP)
	$(PY) -m experiments.hf_convert

# A small Flax NNX transformer trained by spmd on fsdp=4,tensor=2, beside the same run on one device.
flax-model: $(STAMP)
	$(PY) -m experiments.flax_model

# Local SGD / DiLoCo (H = 1, 4, 16) against synchronous DP: gpt-small, data=4 workers on 8 CPU devices;
# eval loss vs steps and vs bytes over `data`. Writes experiments/results/local_sgd.md and .png.
local-sgd: $(STAMP)
	$(PY) -m experiments.local_sgd
