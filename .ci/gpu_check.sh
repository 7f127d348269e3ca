#!/bin/bash
# One prepared GPU check for the device tool (~8 min): tests/test_cuda.py, GPU train-speed, a 2-minute GPU MNIST
# run and its evaluation. The device machine sees only the checkout, so first fill the ignored .gpu/ folder:
#   mkdir -p .gpu/data/MNIST/raw && cp ../shared/data/MNIST/raw/*.gz ../shared/data/MNIST/raw/MD5SUMS .gpu/data/MNIST/raw/
#   cp checkpoints/mnist_classifier.pth .gpu/   # after `python evaluate.py train-classifier --data-root ../shared/data`
#   .venv/bin/pip download -q -d .gpu/wheels huggingface_hub safetensors torchdiffeq   # it has no internet to pip from
# (16 MB: the .gz files only, as the tool carries at most 64 MiB).
# then: run(command="bash .ci/gpu_check.sh", carry=[".gpu"], timeout_s=560). Results land in $OUT.
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" checkpoints
stage() { echo "== [$SECONDS s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
cp .gpu/mnist_classifier.pth checkpoints/
python3 -c "import huggingface_hub, safetensors, torchdiffeq" 2>/dev/null || \
  python3 -m pip install -q --no-index --find-links .gpu/wheels huggingface_hub safetensors torchdiffeq 2>&1 | tail -2
stage "tests/test_cuda.py"
timeout 240 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -25 | tee "$OUT/test_cuda.txt"
stage "train-speed"
for a in "mnist --preset gpu" "mnist --preset gpu --channels-last off" "mnist --preset gpu --compile" \
         "mnist --preset cpu --device cuda" "rf --preset small32" "rf --preset celeba64" "rf --preset dit32"; do
  timeout 150 python3 benchmark.py train-speed --out /tmp/ts.json $a 2>&1 | grep -E "img/s|rror" | tee -a "$OUT/train_speed.txt"
done
stage "mnist gpu preset, 2-minute budget"
timeout 200 python3 mnist_train.py --preset gpu --data-root .gpu/data --time-budget 2 --out-dir /tmp/g \
  --checkpoint "$OUT/mnist_gpu.pth" 2>&1 | tr '\r' '\n' | grep -v -E "it/s|s/it" | grep . | tail -14 | tee "$OUT/train.txt"
cp /tmp/g/log.jsonl "$OUT/log.jsonl" 2>/dev/null
stage "evaluate"
timeout 90 python3 evaluate.py mnist --checkpoint "$OUT/mnist_gpu.pth" --data-root .gpu/data --n 4000 2>&1 | tail -3 | tee "$OUT/eval.txt"
stage "done"
