# Two commands on a fresh machine with Python >= 3.11:
#   make demo   the embedded default RL run (`league train` on a tiny model, CPU, a few minutes)
#   make test   the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines get the CPU build of torch (a plain `pip install torch` would fetch the multi-GB CUDA build)
TORCH := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/league train

test: $(VENV)/.installed
	$(BIN)/python -m pytest -n 2 --dist loadgroup tests

lint: $(VENV)/.installed
	$(BIN)/ruff check league tests benchmarks
	$(BIN)/ruff format --check league tests benchmarks

clean:
	rm -rf $(VENV) runs
