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

# make one-step: make train's flow into a one-step model. PAIRS paths drawn from the flow (its recorded sampler), then
# ONE_STEP_MINUTES of training on them; both together about make train's own minutes (docs/one-step.md).
FLOW ?= checkpoints/flow_matching_mnist.pth
PAIRS ?= 4000
ONE_STEP_MINUTES ?= 3.1

.PHONY: setup train one-step demo test clean clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-fid.txt requirements-demo.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install --quiet --index-url $(TORCH_INDEX) torch torchvision)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-fid.txt
	touch $@

train: setup
	$(BIN)/python mnist_train.py --data-root $(DATA_ROOT) --time-limit $(TIME_LIMIT) $(ARGS)
	$(BIN)/python mnist_test.py --checkpoint checkpoints/flow_matching_mnist.pth --out samples/mnist_digits.png

# The paths belong to the flow they were drawn from, so they are drawn anew each time; an earlier one-step run in
# checkpoints/mnist-one-step is kept as checkpoints/mnist-one-step.N.
one-step: setup
	@start=$$(date +%s) && rm -rf checkpoints/mnist-one-step-paths && \
	$(BIN)/python reflow.py pairs --checkpoint $(FLOW) --out-dir checkpoints/mnist-one-step-paths --count $(PAIRS) \
		--shard-size 2000 --states && \
	$(BIN)/python reflow.py distill --objective meanflow --pairs checkpoints/mnist-one-step-paths --init-from $(FLOW) \
		--batch-size 128 --lr 2e-3 --warmup-steps 20 --amp auto --val-size 200 --time-budget $(ONE_STEP_MINUTES) \
		--out-dir checkpoints/mnist-one-step --out checkpoints/mnist_one_step.pth $(ARGS) && \
	echo "make one-step: $$(( ($$(date +%s) - start) / 60 )) min $$(( ($$(date +%s) - start) % 60 )) s from $(FLOW) to checkpoints/mnist_one_step.pth (paths and training)"
	$(BIN)/python mnist_test.py --checkpoint checkpoints/mnist_one_step.pth --out samples/mnist_one_step.png

# The demo page on http://127.0.0.1:7860 (PORT=N, ARGS="--checkpoint PATH"): the committed models, no training.
demo: setup
	$(BIN)/python app.py --port $(or $(PORT),7860) --data-root $(DATA_ROOT) $(ARGS)

test: setup
	$(BIN)/ruff check .
	DATA_ROOT=$(DATA_ROOT) $(BIN)/python -m pytest -q tests

clean:
	rm -rf checkpoints samples

clean-venv:
	rm -rf $(VENV)
