# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on a fresh machine,
# installing torch (CPU wheel) before anything that depends on it, so pip never pulls a CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo demo-text demo-video test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip freeze | grep -i '^torch==' > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/mdm demo --out runs/demo

demo-text: $(BIN)/.installed
	$(BIN)/mdm demo --preset demo-text --out runs/demo-text

demo-video: $(BIN)/.installed
	$(BIN)/mdm demo --preset demo-video --out runs/demo-video

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/unet_speed.py
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/data_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
