# Two entry points: `make train` (set up, then train the enhanced recipe) and `make test`.
# Both create ./.venv on first use and reinstall only when their requirements file changes: `make train` installs
# only what training needs (requirements.txt); `make test` adds the development set (requirements-dev.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=
# pytest-xdist workers for `make test` (auto: one per core; 0 runs the suite in this process)
TEST_WORKERS ?= auto
# Builder of the JPEG re-encoded CIFAR-10 copy the committed results were measured on; used only when present
# and ./data is empty (otherwise the scripts download the official archive).
LOCAL_CIFAR ?= ../shared/data/make_cifar10.py

.PHONY: install install-dev train train-baseline data test benchmark benchmark-inference clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

# requirements-dev.txt includes requirements.txt and requirements-export.txt (onnx, onnxscript, onnxruntime): the
# export tests need them.
$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt requirements-export.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

data: install
	@if [ ! -d data/cifar-10-batches-py ] && [ -f "$(LOCAL_CIFAR)" ]; then \
		$(BIN)/python "$(LOCAL_CIFAR)" data; fi

train: data
	$(BIN)/python mobilenetv4_enhanced.py $(ARGS)

train-baseline: data
	$(BIN)/python mobilenetv4_baseline.py $(ARGS)

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope tests

benchmark: data
	$(BIN)/python benchmarks/throughput.py $(ARGS)

benchmark-inference: install-dev
	$(BIN)/python benchmarks/inference.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
