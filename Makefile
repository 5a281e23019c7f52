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

.PHONY: install install-dev train train-baseline data test test-floor mutants benchmark benchmark-inference clean

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

# The floor: the lowest torch / torchvision requirements.txt allows, exactly, in an environment of its own, kept in
# FLOOR_ROOT under a name made from requirements.txt's hash (a new requirements.txt builds a new one and removes the
# old). PyPI's Linux wheels of these releases are CUDA builds: about 2.7 GB to download and 5 GB installed, once.
FLOOR_ROOT  ?= $(HOME)/.cache/mnv4-floor
FLOOR_PINS  := $(shell sed -n 's/^\(torch\|torchvision\)>=\([0-9.]*\).*/\1==\2/p' requirements.txt)
FLOOR_VENV  := $(FLOOR_ROOT)/$(shell sha256sum requirements.txt | cut -c1-16)
FLOOR_TESTS := tests/test_floor.py \
	tests/test_devices.py::test_the_runs_precision_context_builds_for_every_device_type \
	tests/test_devices.py::test_no_autocast_is_built_when_amp_is_off \
	tests/test_devices.py::test_amp_on_mps_runs_what_it_records_or_names_the_torch_it_needs \
	tests/test_devices.py::test_an_autocast_torch_turns_off_is_refused_rather_than_recorded \
	tests/test_devices.py::test_a_mid_epoch_checkpoint_on_mps_before_torch_2_5_is_refused_in_one_line

# No prerequisite: the folder's name is requirements.txt's hash, and a fresh clone's file times say nothing.
$(FLOOR_VENV)/.installed:
	@test "$(words $(FLOOR_PINS))" = 2 || { echo "requirements.txt must bound torch and torchvision with >=" >&2; exit 1; }
	@for old in $(FLOOR_ROOT)/*/; do [ -f "$$old/pyvenv.cfg" ] && rm -rf "$$old"; done; true
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q -r requirements.txt $(FLOOR_PINS) pytest
	touch $@

test-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider $(FLOOR_TESTS)

# Mutation testing of the schedules, optimizer, evaluation, augmentation, checkpoint and epoch-loop code against a
# fast test selection per module (tools/mutants.py); survivors go to results/mutants.md. Too slow for CI.
MUTANT_ARGS ?= --sample 30 --sample-heavy 10
mutants: install-dev
	nice -n 5 $(BIN)/python tools/mutants.py $(MUTANT_ARGS) --report results/mutants.md

benchmark: data
	$(BIN)/python benchmarks/throughput.py $(ARGS)

benchmark-inference: install-dev
	$(BIN)/python benchmarks/inference.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
