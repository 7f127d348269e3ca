"""The MNIST readers: two small classifiers that evaluate.py's metrics read generated digits with (accuracy, Fréchet
distance and precision / recall in their 128-d features), how they are trained and loaded. They train by their own
short loop, not trainer.train: that loop trains velocity fields (noise, times, EMA, sample grids), a reader learns
labels by cross-entropy.

    python evaluate.py train-classifier --data-root ../shared/data              # the default reader (CNN)
    python evaluate.py train-classifier --data-root ../shared/data --arch bn-cnn   # the second, independent one
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from checkpoint import CheckpointError, save_checkpoint
from data import TensorImages, load_mnist
from progress import progress

CLASSIFIER_PATH = "checkpoints/mnist_classifier.pth"
BN_CLASSIFIER_PATH = "checkpoints/mnist_classifier_bn.pth"  # the second reader: --arch bn-cnn
OWN_PATH = ""  # train_classifier's out: the arch's own path (CLASSIFIERS); None saves nothing


class Reader(nn.Module):
    """An MNIST classifier: self.conv maps (B, 1, 28, 28) in [-1, 1] to 128-d features, self.head those to 10 logits."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 128): the space the Fréchet distance is measured in."""
        return self.conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MnistClassifier(Reader):
    """Two conv layers and two linear ones; input (B, 1, 28, 28) in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Dropout(0.25), nn.Flatten(), nn.Linear(64 * 12 * 12, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(128, 10))


class MnistBNClassifier(Reader):
    """A second reader sharing nothing with MnistClassifier but the task: four 3x3 conv layers with BatchNorm and two
    linear ones, trained on digits shifted by up to 2 pixels; input (B, 1, 28, 28) in [-1, 1]."""

    def __init__(self):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.conv = nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 7 * 7, 128, bias=False),
                                  nn.BatchNorm1d(128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))


# arch -> (network, epochs, largest random shift in pixels during training, default file)
CLASSIFIERS = {"cnn": (MnistClassifier, 5, 0, CLASSIFIER_PATH), "bn-cnn": (MnistBNClassifier, 3, 2, BN_CLASSIFIER_PATH)}


def random_shift(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """Each image of x (B, C, H, W) moved by its own random offset of up to `pixels` each way, on background (-1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, b, 1))
    rows, cols = (dy + torch.arange(h))[:, :, None], (dx + torch.arange(w))[:, None, :]
    return padded.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols].permute(0, 3, 1, 2)


@torch.no_grad()
def predict(classifier: Reader, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted digits (N,), features (N, 128)) for images (N, 1, 28, 28) in [-1, 1]."""
    classifier.eval()
    device = next(classifier.parameters()).device
    preds, feats = [], []
    for i in range(0, len(images), batch_size):
        f = classifier.features(images[i:i + batch_size].to(device))
        feats.append(f.cpu())
        preds.append(classifier.head(f).argmax(1).cpu())
    return torch.cat(preds), torch.cat(feats)


def tensors(data: TensorImages, n: int | None = None, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 1, 28, 28) in [-1, 1] and labels (n,) from a TensorImages set, without a DataLoader."""
    stop = len(data) if n is None else start + n
    return data.images[start:stop].float() / 127.5 - 1, data.labels[start:stop]


def train_classifier(data_root: str, epochs: int | None = None, subset: int = 0, seed: int = 0,
                     out: str | None = OWN_PATH, device: torch.device | str = "cpu", arch: str = "cnn") -> float:
    """Train a reader (CLASSIFIERS; epochs None = its own) on the MNIST training set only; save it with its arch and
    test accuracy to out (OWN_PATH: the arch's file); return that accuracy."""
    if arch not in CLASSIFIERS:
        raise ValueError(f"unknown classifier arch {arch!r}: choose one of {', '.join(CLASSIFIERS)}")
    network, default_epochs, shift, own_path = CLASSIFIERS[arch]
    epochs = default_epochs if epochs is None else epochs
    if not 1 <= epochs <= 100:
        raise ValueError(f"--epochs must lie in 1..100, got {epochs}")
    out = own_path if out == OWN_PATH else out
    # its own loop, not trainer.train: that one learns velocities (noise, times, EMA, sample grids), this one labels
    torch.manual_seed(seed)
    train_set = load_mnist(data_root, train=True, download=False)
    if subset:
        train_set = torch.utils.data.Subset(train_set, range(subset))
    test_x, test_y = tensors(load_mnist(data_root, train=False, download=False))
    model = network().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(train_set, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(seed))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * len(loader))
    for epoch in range(epochs):
        model.train()
        for x, y in progress(loader, f"classifier epoch {epoch + 1}/{epochs}"):
            x = random_shift(x, shift) if shift else x
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    recalibrate_batchnorm(model, loader, device)
    accuracy = (predict(model, test_x)[0] == test_y).float().mean().item()
    if out:
        save_checkpoint(out, {"model_state": model.state_dict(), "test_accuracy": accuracy, "kind": "mnist-classifier",
                               "arch": arch})
    return accuracy


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, device: torch.device | str, batches: int = 50) -> None:
    """Re-estimate BatchNorm statistics on training batches under the final weights: the running averages lag weights
    that moved fast, and short runs (a test's) read at chance in eval mode without it. No-op without BatchNorm."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches below
    model.train()
    for x, _ in itertools.islice(loader, batches):
        model(x.to(device))


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[Reader, float]:
    """The saved classifier (either arch) and its test accuracy; a clear error when it has not been trained yet."""
    if not Path(path).is_file():
        arch = next((f" --arch {a}" for a, c in CLASSIFIERS.items() if Path(c[3]) == Path(path) and a != "cnn"), "")
        raise CheckpointError(f"classifier {path} not found: make it first with `python evaluate.py train-classifier "
                              f"--data-root DIR{arch} --out {path}` (a few CPU minutes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage, a truncated file, pickled objects: none of them is a reader
        raise CheckpointError(f"{path} is not an MNIST classifier written by evaluate.py ({type(e).__name__})"
                              ) from None
    if not isinstance(state, dict) or state.get("kind") != "mnist-classifier":
        raise CheckpointError(f"{path} is not an MNIST classifier written by evaluate.py")
    arch = state.get("arch", "cnn")  # files from before the arch key hold the first CNN
    if arch not in CLASSIFIERS:
        raise CheckpointError(f"{path} holds a classifier of arch {arch!r}, which this repo does not know "
                              f"({', '.join(CLASSIFIERS)}): retrain it with `python evaluate.py train-classifier`")
    model = CLASSIFIERS[arch][0]()
    model.load_state_dict(state["model_state"])
    return model.to(device).eval(), state["test_accuracy"]
