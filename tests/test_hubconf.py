"""torch.hub entries (hubconf.py), loaded as torch.hub loads them, from the clone (source="local")."""
from pathlib import Path

import torch

from helpers import tiny_checkpoint
from sampling import sample_from_checkpoint
from solvers import Sampler

ROOT = str(Path(__file__).resolve().parents[1])


def hub(entry: str, *args, **kwargs):
    return torch.hub.load(ROOT, entry, *args, source="local", **kwargs)


def test_the_committed_models_load_with_their_recorded_samplers_and_sample():
    model = hub("mnist_1rf", device="cpu")
    assert model.sampler == Sampler("midpoint", 4, 1.1) and not model.training
    images = hub("sample", model, labels=[0, 1, "7"], seed=2)
    assert images.shape == (3, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, sample_from_checkpoint(Path(ROOT) / "pretrained" / "mnist-1rf", labels=[0, 1, 7],
                                                      seed=2, device="cpu"))
    one_step = hub("mnist_one_step", device="cpu")
    assert one_step.sampler.steps == 1 and hub("sample", one_step, n=4).shape == (4, 1, 28, 28)
    photos = hub("cifar10_1rf", device="cpu")
    assert photos.class_names[3] == "cat" and hub("sample", photos, labels=["cat", 8]).shape == (2, 3, 32, 32)
    jumps = hub("cifar10_one_step", device="cpu")
    assert jumps.sampler.steps == 1 and jumps.class_names == photos.class_names
    assert hub("sample", jumps, labels=["ship"]).shape == (1, 3, 32, 32)


def test_from_checkpoint_takes_any_checkpoint_and_sample_takes_overrides(tmp_path):
    tiny_checkpoint(tmp_path / "m.pth")
    model = hub("from_checkpoint", tmp_path / "m.pth", device="cpu")
    assert model.sampler == Sampler()  # it records none: the defaults
    assert torch.equal(hub("sample", model, n=3, solver="euler", steps=2, seed=5),
                       sample_from_checkpoint(tmp_path / "m.pth", batch_size=3, solver="euler", steps=2, seed=5))


def test_the_hub_lists_only_the_models_and_helpers():
    import hubconf  # torch.hub.list's rule, which takes no local repo: every public callable is an entry point

    entries = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert entries == {"from_checkpoint", "mnist_1rf", "mnist_one_step", "cifar10_1rf", "cifar10_one_step", "sample"}
