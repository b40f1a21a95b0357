# The two commands of the README. Both create .venv and install what they need.
#   make demo   build the built-in dataset, train the tiny model, evaluate it
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
# The default objective (electra, per-modality generator) on object crops, 2000 steps.
DEMO_CONFIG ?= configs/pretrain.py:size=tiny,regions=crops,runlocal

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,export]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/mmelectra train --config=$(DEMO_CONFIG) --workdir=$(DEMO_DIR)
	$(VENV)/bin/mmelectra evaluate --workdir=$(DEMO_DIR)
	$(VENV)/bin/mmelectra export --workdir=$(DEMO_DIR) --out=$(DEMO_DIR)/hf --verify

# Two workers (pytest-xdist), one test file each at a time: module fixtures are built once.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) runs data build *.egg-info
