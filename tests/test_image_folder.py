"""The image-folder loader on real photos plus generated bad files."""
import logging
import shutil

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
