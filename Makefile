# Two entry points: `make train` (set up, train MNIST, draw a digit grid) and `make test`.
# Each creates ./.venv on first use and reinstalls when the requirements change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Offline machines that carry the real MNIST files in ../shared/data read them from there.
DATA_ROOT ?= $(if $(wildcard ../shared/data/MNIST/raw),../shared/data,data)
# Minutes mnist_train.py may take: the preset's epochs, or an earlier end (the LR decay fitted to it) on a machine
# or in an hour too slow for them, so that `make train` stays within 10 minutes anywhere (TIME_LIMIT=0 lifts it).
TIME_LIMIT ?= 9.5
ARGS ?=
# Which PyTorch build `make setup` installs: empty = PyPI's default. A CUDA build that the driver runs
# (`nvidia-smi` shows the highest CUDA it supports), e.g. https://download.pytorch.org/whl/cu126, or the
# CPU-only build, https://download.pytorch.org/whl/cpu (a fraction of the size). Changing it needs `make clean-venv`.
TORCH_INDEX ?=

.PHONY: setup train test clean clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-fid.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install --quiet --index-url $(TORCH_INDEX) torch torchvision)
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

clean-venv:
	rm -rf $(VENV)
