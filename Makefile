# Two commands set up a fresh machine:
#   make demo   venv + install, prepare Shakespeare, a short CPU training run, samples
#   make test   venv + install (with test tools), then the test suite
# INPUT=path/to/input.txt makes prepare read a local copy instead of downloading.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INPUT ?=
PREPARE_FLAGS := $(if $(INPUT),--input=$(INPUT),)

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: requirements.txt $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-test: requirements-test.txt requirements.txt $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python data/shakespeare_char/prepare.py $(PREPARE_FLAGS)
	$(BIN)/python train.py config/train_shakespeare_char_cpu.py
	$(BIN)/python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=300

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) out-shakespeare-char
