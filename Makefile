# kdarena: the README's commands. `make quickstart` trains the quickstart; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch; set TORCH=torch (or a CUDA wheel) on a GPU machine.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup quickstart test test-fast data lint clean

setup: $(BIN)/kdarena

$(BIN)/kdarena: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,plot,tensorboard,export,ray,tune]"
	touch $@

# Fashion-MNIST from Debian's package when it is missing (offline); otherwise kdarena can download it.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ ! -d "$${KDARENA_DATA:-/nonexistent}" ] && [ ! -d "$$HOME/.cache/kdarena/fashion-mnist" ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || true; \
		fi; \
	fi

quickstart: setup data
	@if [ -d /usr/share/datasets/fashion-mnist ] || [ -n "$$KDARENA_DATA" ] || [ -d "$$HOME/.cache/kdarena/fashion-mnist" ]; then \
		$(BIN)/kdarena train configs/quickstart.yaml --out runs/quickstart --force; \
	else \
		$(BIN)/kdarena train configs/quickstart.yaml data.download=true --out runs/quickstart --force; \
	fi

test: setup data
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
