"""The image-folder loader on real photos plus generated bad files."""
import logging
import shutil

import numpy as np

import pytest
import torch
from PIL import Image

from data import DataError, ImageFolder, image_folder_splits


@pytest.fixture
def folder(cifar_root, tmp_path):
    """40 real CIFAR-10 photos in two class folders, a nested PNG, a corrupt JPEG, a text file."""
    root = tmp_path / "photos"
    for cls in ("cat", "ship"):
        (root / cls / "deep").mkdir(parents=True)
        for src in sorted((cifar_root / cls).glob("*.jpg"))[:20]:
            shutil.copy(src, root / cls / src.name)
    Image.new("RGB", (50, 40), (255, 0, 0)).save(root / "ship" / "deep" / "red.png")
    (root / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_loads_real_photos_skips_bad_files_with_one_warning(folder, caplog):
    with caplog.at_level(logging.WARNING):
        train, val, names = image_folder_splits(folder, 32, val_fraction=0.0)
    assert val is None and names is None and len(train) == 41  # 40 jpg + 1 png; corrupt and txt skipped
    assert sum("skipped 1 of 42" in r.message for r in caplog.records) == 1
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() < x.max() <= 1 and y == 0


def test_class_from_folders(folder):
    train, _, names = image_folder_splits(folder, 16, val_fraction=0.0, class_from_folders=True)
    assert names == ["cat", "ship"]
    labels = [train.label(i) for i in range(len(train))]
    assert labels.count(0) == 20 and labels.count(1) == 21  # the nested png belongs to "ship"


def test_validation_split_is_deterministic_and_disjoint(folder):
    a_train, a_val, _ = image_folder_splits(folder, 16, val_fraction=0.3)
    b_train, b_val, _ = image_folder_splits(folder, 16, val_fraction=0.3)
    assert a_val.files == b_val.files and a_train.files == b_train.files
    assert not set(a_train.files) & set(a_val.files)
    assert 4 <= len(a_val) <= 22 and len(a_train) + len(a_val) == 41


def test_undecodable_file_is_replaced_not_fatal(folder, caplog):
    # Header fine, data truncated: passes the scan, fails at decode time mid-epoch.
    good = sorted((folder / "cat").glob("*.jpg"))[0]
    cut = folder / "cat" / "0000_cut.jpg"
    cut.write_bytes(good.read_bytes()[:300])
    data = ImageFolder([cut, good], folder, 32)
    with caplog.at_level(logging.WARNING):
        x, _ = data[0]
    assert x.shape == (3, 32, 32) and "skipping unreadable image" in caplog.text


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folder_splits(tmp_path / "nope", 32, 0.1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        image_folder_splits(tmp_path / "empty", 32, 0.1)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "P", "RGBA", "LA", "CMYK", "L", "1"])
def test_images_of_every_mode_read_as_their_colours(tmp_path, mode):
    """A mid-grey square on black, saved in each mode (16-bit greys included, which convert("RGB") saturates to
    white); transparent pixels read as white."""
    from PIL import Image

    from data import to_rgb

    grey = np.zeros((8, 8), dtype=np.float64)
    grey[2:6, 2:6] = 0.5 if mode != "1" else 1.0
    if mode in ("I;16", "I"):
        im = Image.fromarray((grey * 65535).astype(np.int32 if mode == "I" else np.uint16))
    elif mode == "CMYK":  # grey as black ink: K = 1 - grey
        ink = np.zeros((8, 8, 4), dtype=np.uint8)
        ink[..., 3] = np.round((1 - grey) * 255 + 0.01).astype(np.uint8)
        im = Image.fromarray(ink, "CMYK")
    elif mode == "F":
        im = Image.fromarray(grey.astype(np.float32), "F")
    else:
        im = Image.fromarray(np.round(grey * 255).astype(np.uint8), "L").convert("RGB" if mode == "P" else "L")
        if mode in ("RGBA", "LA"):
            im = im.convert(mode)
            im.putpixel((0, 0), (0, 0) if mode == "LA" else (0, 0, 0, 0))  # one transparent pixel
        elif mode == "P":
            im = im.convert("P", palette=Image.Palette.ADAPTIVE)  # (the default web palette has no 128 grey)
        elif mode != "L":
            im = im.convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("F", "CMYK", "I") else "x.png")
    im.save(path)
    with Image.open(path) as back:
        rgb = np.asarray(to_rgb(back))
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    expected = 255 if mode == "1" else 128
    assert abs(int(rgb[4, 4, 0]) - expected) <= 1 and (rgb[4, 4] == rgb[4, 4, 0]).all(), rgb[4, 4]
    assert rgb[7, 7].max() <= 1  # black stays black
    if mode in ("RGBA", "LA"):
        assert (rgb[0, 0] == 255).all()  # transparent: white
