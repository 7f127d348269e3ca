"""sampling.py: NFE per image, noise independent of batch size, requests refused before any work."""
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from helpers import TINY, tiny_checkpoint
from sampling import sample_from_checkpoint, sample_model
from solvers import Sampler, make_noise
from unet import ConditionalUNet


def images_through(model: torch.nn.Module) -> list[int]:
    """Batch sizes of every forward pass of model, appended as they run."""
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    return sizes


@pytest.mark.parametrize("num_classes,guidance,nfe", [(3, 1.5, 16), (3, 1.0, 8), (None, 1.0, 8)])
def test_nfe_counts_network_evaluations_per_image(num_classes, guidance, nfe):
    torch.manual_seed(0)
    model = ConditionalUNet(replace(TINY, num_classes=num_classes)).eval()
    sizes = images_through(model)
    samples = sample_model(model, 3, sampler=Sampler("midpoint", 4, guidance), batch_size=3)
    assert samples.nfe == nfe
    assert sum(sizes) == 3 * nfe  # what the network really ran: a guided call is a double batch


def test_noise_is_independent_of_batch_size(tmp_path):
    tiny_checkpoint(tmp_path / "c.pth")
    draw = lambda batch_size: sample_from_checkpoint(tmp_path / "c.pth", labels=[0, 1, 2, 0, 1], steps=2,
                                                     batch_size=batch_size, seed=3, device="cpu")
    small, whole = draw(2), draw(5)
    assert small.shape == (5, 1, 8, 8)
    assert torch.allclose(small, whole, atol=1e-5)
    assert not torch.allclose(small[0], small[3], atol=1e-2)  # same label, different noise


def test_nearby_seeds_draw_disjoint_noise_and_any_range_can_be_drawn_alone():
    base = make_noise(64, (4,), 0, "cpu")
    for seed in (1, 2, 7, 999):  # torch keeps 32 bits of a seed: seed + i would make seed 1 seed 0 shifted by one
        other = make_noise(64, (4,), seed, "cpu")
        assert torch.cdist(base, other).min() > 1e-3
    torch.testing.assert_close(make_noise(10, (4,), 0, "cpu", start=50), base[50:60], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(labels=[]), "nothing to draw: 0 images"),
    (dict(steps=0), "steps must lie in 1..100,000 for midpoint"),
    (dict(solver="rk5"), "unknown solver 'rk5'"),
    (dict(batch_size=2.5), "batch_size must be a whole number, got 2.5"),
    (dict(steps=1.5), "steps must be a whole number, got 1.5"),
])
def test_bad_requests_are_refused_before_the_checkpoint_is_read(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):  # the file does not exist: the request was checked first
        sample_from_checkpoint(tmp_path / "absent.pth", device="cpu", **kwargs)


def test_sample_model_refuses_bad_requests():
    model = ConditionalUNet(TINY).eval()
    with pytest.raises(ValueError, match="nothing to draw"):
        sample_model(model, 0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        sample_model(model, 2, batch_size=0)


def test_guidance_needs_a_trained_null_label(tmp_path):
    tiny_checkpoint(tmp_path / "no_dropout.pth", label_dropout=0.0)
    tiny_checkpoint(tmp_path / "dropout.pth", label_dropout=0.1)
    tiny_checkpoint(tmp_path / "older.pth", label_dropout=None)  # written before train_config existed
    sample = lambda name, w: sample_from_checkpoint(tmp_path / name, batch_size=2, steps=1, guidance=w, device="cpu")
    with pytest.raises(ValueError, match="trained with --label-dropout 0.*sample with guidance 1"):
        sample("no_dropout.pth", 1.5)
    assert sample("no_dropout.pth", 1.0).shape == (2, 1, 8, 8)
    assert sample("dropout.pth", 1.5).shape == sample("older.pth", 1.5).shape == (2, 1, 8, 8)


def test_absent_device_is_a_clear_error(tmp_path):
    tiny_checkpoint(tmp_path / "c.pth")
    device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: absent on every machine
    with pytest.raises(ValueError, match="CUDA GPU"):
        sample_from_checkpoint(tmp_path / "c.pth", device=device)


def test_labels_may_be_class_names_where_the_checkpoint_records_them(tmp_path):
    from checkpoint import load_checkpoint

    tiny_checkpoint(tmp_path / "plain.pth")  # no class names recorded
    with pytest.raises(ValueError, match="unknown label 'cat': labels are class indices"):
        sample_from_checkpoint(tmp_path / "plain.pth", labels=["cat"], steps=1, device="cpu")
    with pytest.raises(ValueError, match="labels are class indices"):
        sample_from_checkpoint(tmp_path / "plain.pth", labels=[0.5], steps=1, device="cpu")
    ckpt = {**load_checkpoint(tmp_path / "plain.pth"), "class_names": ["cat", "dog", "frog"]}
    by_name = sample_from_checkpoint(ckpt, labels=["frog", "cat"], steps=1, seed=0, device="cpu")
    by_index = sample_from_checkpoint(ckpt, labels=[2, 0], steps=1, seed=0, device="cpu")
    assert torch.equal(by_name, by_index)
    with pytest.raises(ValueError, match="unknown label 'bird': labels are one of cat, dog, frog"):
        sample_from_checkpoint(ckpt, labels=["bird"], steps=1, device="cpu")


def test_the_seeds_own_call_runs_as_its_readme_writes_it(tmp_path, monkeypatch):
    """The seed README's `sample_from_checkpoint(checkpoint_path=..., out_path=..., steps=2000, batch_size=4)`, executed
    verbatim from ../shared/seeds (the public names are a promise)."""
    readme = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "flow-image-generator-README.md"
    if not readme.is_file():
        pytest.skip(f"the seed's README is not at {readme}")
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    call = next(b for b in blocks if "checkpoint_path=" in b and "sample_from_checkpoint(" in b)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoints" / "rf_best.pth"  # a one-level U-Net recording Euler: 2,000 steps in seconds
    tiny_checkpoint(path, replace(TINY, channel_mult=(1,), attention_resolutions=(), num_classes=None), None)
    save_checkpoint(path, {**load_checkpoint(path), "sampler": {"solver": "euler", "steps": 4, "guidance": 1.0}})
    original, calls = ConditionalUNet.forward, []  # every forward pass: the 2,000 steps are taken
    counted = lambda self, x, *a: (calls.append(len(x)), original(self, x, *a))[1]  # noqa: E731
    monkeypatch.setattr(ConditionalUNet, "forward", counted)
    exec(compile(call, "seed README", "exec"), {})
    assert (tmp_path / "samples" / "sample.png").stat().st_size > 100 and calls == [4] * 2000


def test_a_grid_has_one_row_per_class_whatever_the_label_order_and_whole_class_names(tmp_path):
    """labels [0..9] * 6 (cycling) give 10 rows of 6, as the same labels grouped do; long names fit the margin."""
    from PIL import Image

    from sampling import save_grid

    images = torch.rand(60, 3, 8, 8)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    cycled = save_grid(images, tmp_path / "cycled.png", torch.arange(10).repeat(6), names, scale=1)
    grouped = save_grid(images, tmp_path / "grouped.png", torch.arange(10).repeat_interleave(6), names, scale=1)
    width, height = Image.open(cycled).size
    assert (width, height) == Image.open(grouped).size and height == 10 * 10 + 2
    margin = width - (6 * 10 + 2)
    assert margin >= 6 * len("automobile")  # the whole name, ~6 px a character
    pixel = lambda path, row, col: Image.open(path).getpixel((margin + 2 + col * 10 + 4, 2 + row * 10 + 4))  # noqa
    # image i of the cycled request is class i % 10, its (i // 10)-th: row i % 10, column i // 10
    for i in (0, 13, 59):
        expected = tuple((images[i, :, 4, 4] * 255).round().int().tolist())
        assert pixel(cycled, i % 10, i // 10) == expected
    square = save_grid(images[:10], tmp_path / "plain.png", scale=1)
    assert Image.open(square).size == (4 * 10 + 2, 3 * 10 + 2)  # unlabelled: rows of ceil(sqrt(10)) = 4
