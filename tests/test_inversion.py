"""Inversion (images back to noise), class swap and interpolation, on a tiny trained model and from the CLI."""
import pytest
import torch

import editing
from checkpoint import RunRecord, load_checkpoint, model_from_checkpoint
from editing import (class_swap, gaussianity, interpolate_images, invert_from_checkpoint, invert_model, psnr,
                     regenerate, slerp)
from helpers import TINY, TINY_MNIST, blobs, fit, tiny_checkpoint, tiny_config
from sampling import MEANFLOW_SAMPLER
from solvers import Sampler, integrate
from unet import ConditionalUNet, ModelConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on three classes of blobs, and eight of those images in [0, 1] with labels."""
    tmp = tmp_path_factory.mktemp("inv")
    fit(tiny_config(tmp, epochs=4), TINY, blobs(), blobs(24, seed=1), record=RunRecord(class_names=["a", "b", "c"]))
    path = tmp / "best.pth"
    data = blobs(8, seed=2)
    images = torch.stack([(data[i][0] + 1) / 2 for i in range(8)])
    return path, model_from_checkpoint(load_checkpoint(path)).eval(), images, data.labels


def test_invert_then_generate_returns_the_image_with_dopri5(trained):
    _, model, images, labels = trained
    images, labels = images[:4], labels[:4]
    noise = invert_model(model, images, labels, Sampler("dopri5", 1, 1.0, 1e-6, 1e-6)).noise
    back = regenerate(model, noise, labels, Sampler("dopri5", 1, 1.0, 1e-6, 1e-6))
    assert (back - images).abs().max() < 1e-3
    assert not torch.allclose(noise, images * 2 - 1, atol=0.1)  # the noise is somewhere else entirely


def test_reconstruction_error_falls_with_steps(trained):
    _, model, images, labels = trained
    errors = []
    for steps in (1, 2, 4, 8, 16):
        noise = invert_model(model, images, labels, Sampler("euler", steps)).noise
        errors.append((regenerate(model, noise, labels, Sampler("euler", steps)) - images).square().mean().item())
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 8


def test_invert_from_checkpoint_takes_the_recorded_sampler(trained):
    path, model, images, labels = trained
    ckpt = load_checkpoint(path)
    ckpt["sampler"] = {"solver": "euler", "steps": 3, "guidance": 1.5}
    expected = invert_model(model, images, labels, Sampler("euler", 3, 1.5)).noise
    assert torch.equal(invert_from_checkpoint(ckpt, images, labels), expected)
    # a one-jump meanflow sampler runs forwards only: inversion takes the default ODE solver on u(x, t, t) = v
    ckpt["sampler"] = MEANFLOW_SAMPLER.record()
    expected = invert_model(model, images, labels, Sampler()).noise
    assert torch.equal(invert_from_checkpoint(ckpt, images, labels), expected)
    assert not torch.equal(invert_from_checkpoint(ckpt, images, labels, use_ema=False), expected)


def test_class_swap_to_the_own_class_is_the_reconstruction(trained):
    _, model, images, labels = trained
    targets = torch.tensor([0, 1, 2])
    swapped = class_swap(model, images, labels, targets, Sampler("dopri5", 1))
    assert swapped.shape == (8, 3, 1, 8, 8)
    own = swapped[torch.arange(8), labels]
    assert (own - images).abs().max() < 0.02
    # redrawn as another class, the bright square moves to that class's place (blobs: rows/cols 2y..2y+2)
    for y in range(3):
        square = swapped[:, y, 0, 2 * y:2 * y + 3, 2 * y:2 * y + 3].mean()
        assert square > swapped[:, y].mean() + 0.2


def test_slerp_keeps_the_ends_and_the_norm():
    a, b = torch.zeros(2, 4), torch.zeros(2, 4)
    a[0, 0], b[1, 1] = 3.0, 3.0  # orthogonal, equal norms
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.allclose(path[0], a) and torch.allclose(path[-1], b)
    assert torch.allclose(path.flatten(1).norm(dim=1), torch.full((5,), 3.0))
    same = slerp(a, a, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(same, a.expand(3, 2, 4))


def test_interpolation_starts_and_ends_at_the_two_images(trained):
    _, model, images, labels = trained
    same_class = torch.nonzero(labels == labels[0]).flatten()[:2]
    for pair in (same_class, torch.tensor([0, 1])):
        frames = interpolate_images(model, images[pair], labels[pair], frames=6, sampler=Sampler("dopri5", 1))
        assert frames.shape == (6, 1, 8, 8)
        assert psnr(frames[[0, -1]], images[pair]).min() > 25


def test_gaussianity_tells_noise_from_images(trained):
    _, _, images, _ = trained
    noise = gaussianity(torch.randn(64, 784, generator=torch.Generator().manual_seed(0)))
    assert abs(noise["mean"]) < 0.01 and noise["std"] == pytest.approx(1, abs=0.01)
    assert abs(noise["kurtosis"]) < 0.1 and noise["ks"] == pytest.approx(0.87 / 784**0.5, rel=0.3)
    uniform = gaussianity(torch.rand(64, 784) * 2 * 3**0.5 - 3**0.5)  # mean 0, std 1, yet not Gaussian
    assert uniform["kurtosis"] == pytest.approx(-1.2, abs=0.1) and uniform["ks"] > 2 * noise["ks"]
    assert gaussianity(images * 2 - 1)["ks"] > 0.2


def test_bad_input_gets_one_line(trained):
    _, model, images, labels = trained
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        invert_model(model, images * 2 - 1, labels)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        invert_model(model, images[:, :, :4], labels)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        invert_model(model, images.repeat(1, 3, 1, 1), labels)
    with pytest.raises(ValueError, match="floats"):
        invert_model(model, (images * 255).to(torch.uint8), labels)
    with pytest.raises(ValueError, match="one per image"):
        invert_model(model, images, labels[:3])
    with pytest.raises(ValueError, match="give labels"):
        invert_model(model, images, None)
    with pytest.raises(ValueError, match="forwards only"):
        integrate(model, images * 2 - 1, labels, Sampler("meanflow", 1), backwards=True)
    unconditional = ConditionalUNet(ModelConfig(**{**TINY.__dict__, "num_classes": None}))
    with pytest.raises(ValueError, match="unconditional"):
        invert_model(unconditional, images, labels)
    with pytest.raises(ValueError, match="frames"):
        interpolate_images(model, images[:2], labels[:2], frames=1)


def test_cli_inverts_swaps_and_interpolates_mnist_digits(tmp_path, mnist_root):
    path = tmp_path / "mnist.pth"
    tiny_checkpoint(path, TINY_MNIST)
    args = ["--checkpoint", str(path), "--data-root", str(mnist_root), "--solver", "euler", "--steps", "2"]
    result = editing.main(["invert", *args, "--indices", "0-3", "--out", str(tmp_path / "noise.pt")])
    saved = torch.load(tmp_path / "noise.pt")
    assert saved["noise"].shape == (4, 1, 28, 28) and saved["labels"].tolist() == [7, 2, 1, 0]  # test digits 0-3
    assert len(result["psnr"]) == 4
    editing.main(["swap", *args, "--indices", "0,1", "--to", "3-5", "--out", str(tmp_path / "swap.png")])
    editing.main(["interpolate", *args, "--pairs", "0:1,2:3", "--frames", "4", "--out", str(tmp_path / "lerp.png")])
    from PIL import Image
    # 2 rows of the real image + 3 classes; 2 rows of 4 frames between the two real images (2 px gaps, 2x scale)
    assert Image.open(tmp_path / "swap.png").size == ((4 * 30 + 2) * 2, (2 * 30 + 2) * 2)
    assert Image.open(tmp_path / "lerp.png").size == ((6 * 30 + 2) * 2, (2 * 30 + 2) * 2)
    with pytest.raises(ValueError, match="out of range"):
        editing.main(["invert", *args, "--indices", "10000"])
    with pytest.raises(ValueError, match="--data-root DIR"):
        editing.main(["invert", "--checkpoint", str(path)])
    tiny_checkpoint(tmp_path / "no_null.pth", TINY_MNIST, label_dropout=0.0)  # digits 7 and 2 need the null label
    with pytest.raises(ValueError, match="label-dropout"):
        editing.main(["interpolate", *args[:1], str(tmp_path / "no_null.pth"), *args[2:], "--pairs", "0:1"])


def test_benchmark_inversion_measures_each_model_and_setting(tmp_path, mnist_root):
    import json

    import benchmark

    path = tmp_path / "mnist.pth"
    tiny_checkpoint(path, TINY_MNIST)
    rows = benchmark.main(["inversion", "--checkpoints", f"{path},{path}", "--data-root", str(mnist_root), "--n", "10",
                           "--settings", "euler:1,heun:2", "--exact-n", "2", "--exact-setting", "euler:1",
                           "--device", "cpu", "--out-dir", str(tmp_path / "bench")])
    assert [(r["solver"], r.get("nfe"), bool(r.get("divergence_check"))) for r in rows] == [
        ("euler", 1, False), ("heun", 4, False), ("euler", None, True), ("euler", 1, False), ("heun", 4, False)]
    for row in rows[:2]:
        assert row["psnr"] > 0 and row["noise_std"] > 0 and 0 < row["noise_ks"] < 1 and row["bpd_se"] > 0
    check = rows[2]
    assert check["n"] == 2 and abs(check["bpd_hutchinson"] - check["bpd_exact"]) < 1
    assert json.loads((tmp_path / "bench" / "inversion.json").read_text())["rows"][1]["solver"] == "heun"
    assert (tmp_path / "bench" / "inversion.png").stat().st_size > 1000
