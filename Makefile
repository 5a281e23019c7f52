# Two entry points: `make train` (set up, then train the enhanced recipe) and `make test`.
# Both create ./.venv on first use and reinstall only when a requirements file changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=
# pytest-xdist workers for `make test` (auto: one per core; 0 runs the suite in this process)
TEST_WORKERS ?= auto
# Offline CIFAR-10 builder of our CI workspace; used only when present and ./data is empty.
LOCAL_CIFAR ?= ../shared/data/make_cifar10.py

.PHONY: install train train-baseline data test mutants benchmark benchmark-inference clean

# requirements-dev.txt includes requirements-export.txt (onnx, onnxscript, onnxruntime): the export tests need them.
$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-export.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

data: install
	@if [ ! -d data/cifar-10-batches-py ] && [ -f "$(LOCAL_CIFAR)" ]; then \
		$(BIN)/python "$(LOCAL_CIFAR)" data; fi

train: data
	$(BIN)/python mobilenetv4_enhanced.py $(ARGS)

train-baseline: data
	$(BIN)/python mobilenetv4_baseline.py $(ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope tests

# Mutation testing of the schedules, optimizer, evaluation, augmentation, checkpoint and epoch-loop code against a
# fast test selection per module (tools/mutants.py); survivors go to results/mutants.md. Too slow for CI.
MUTANT_ARGS ?= --sample 30 --sample-heavy 10
mutants: install
	nice -n 5 $(BIN)/python tools/mutants.py $(MUTANT_ARGS) --report results/mutants.md

benchmark: data
	$(BIN)/python benchmarks/throughput.py $(ARGS)

benchmark-inference: install
	$(BIN)/python benchmarks/inference.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
