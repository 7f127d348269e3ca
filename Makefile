# Two entry points: `make train` (set up, train MNIST, draw a digit grid) and `make test`.
# Each creates ./.venv on first use and reinstalls when the requirements change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Offline machines that carry the real MNIST files in ../shared/data read them from there.
DATA_ROOT ?= $(if $(wildcard ../shared/data/MNIST/raw),../shared/data,data)
# Minutes mnist_train.py may take: the preset's epochs, or an earlier end on a machine too slow for them, so
# that `make train` stays within ~15 minutes anywhere (TIME_LIMIT=0 lifts it).
TIME_LIMIT ?= 14
ARGS ?=

.PHONY: setup train test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-fid.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-fid.txt
	touch $@

train: setup
	$(BIN)/python mnist_train.py --data-root $(DATA_ROOT) --time-limit $(TIME_LIMIT) $(ARGS)
	$(BIN)/python mnist_test.py --checkpoint checkpoints/flow_matching_mnist.pth --out samples/mnist_digits.png

test: setup
	$(BIN)/ruff check .
	DATA_ROOT=$(DATA_ROOT) $(BIN)/python -m pytest -q tests

clean:
	rm -rf checkpoints samples
