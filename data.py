"""Data sets: MNIST through torchvision, and any folder of images (CelebA's img_align_celeba included).

Every data set yields (image, label) with the image a float tensor (C, H, W) in [-1, 1] and the
label an int (0 where the data has no classes). Random flips happen in the training step, on
the device, so that they follow the step's seed and a resumed run sees the same batches; the order of the
batches is ShardedSampler's, from (seed, epoch); a Batch is what the training step takes.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class DataError(Exception):
    """Data that cannot be found or read; the message says what to do."""


class TensorImages(Dataset):
    """uint8 images (N, H, W) or (N, C, H, W) with labels (N,), scaled to [-1, 1] and resized on access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int):
        self.images = images if images.dim() == 4 else images[:, None]
        self.labels = labels
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float() / 127.5 - 1
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x[None], size=self.image_size, mode="bilinear", antialias=True, align_corners=False)[0]
        return x, int(self.labels[i])


def unpack_local_gz(raw: Path) -> None:
    """Unpack MNIST files present only as .gz: torchvision reads the unpacked ones and, offline, would not unpack."""
    for gz in raw.glob("*-ubyte.gz"):
        out = gz.with_suffix("")
        if not out.exists():
            tmp = out.with_name(out.name + ".part")  # a truncated .gz must not leave a file torchvision would trust
            try:
                with gzip.open(gz) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                tmp.replace(out)
            finally:
                tmp.unlink(missing_ok=True)


def load_mnist(root: str | Path, train: bool, image_size: int = 28, download: bool = True) -> TensorImages:
    """MNIST split read (or downloaded) by torchvision into memory: the same files TensorFlow used."""
    from torchvision.datasets import MNIST

    root = Path(root)
    raw = root / "MNIST" / "raw"
    created = [p for p in (raw, *raw.absolute().parents) if not p.exists()]  # what a download would make
    try:
        unpack_local_gz(raw)
        ds = MNIST(str(root), train=train, download=download)
    except (RuntimeError, OSError, EOFError) as e:  # "Dataset not found", a failed download, a broken .gz
        for folder in created:  # a failed download leaves no empty folders behind to change the next message
            shutil.rmtree(folder, ignore_errors=True)
        raise DataError(
            f"MNIST not found under {root}/MNIST/raw ({str(e).splitlines()[0]}). Put the four files "
            "train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), t10k-images-idx3-ubyte(.gz), "
            f"t10k-labels-idx1-ubyte(.gz) in {root}/MNIST/raw, or give --data-root the folder that holds MNIST/raw"
            + (" (mnist_train.py downloads it there when online)" if not download else "")
        ) from e
    return TensorImages(ds.data, ds.targets, image_size)


def find_images(root: str | Path) -> list[Path]:
    """Image files under root, searched recursively, sorted by relative path; errors if none."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist: pass --data-root DIR (a folder of images, e.g. "
                        "img_align_celeba)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files


def readable(files: list[Path]) -> list[Path]:
    """Files whose header PIL can identify; the rest are skipped with one warning that counts them."""
    good = []
    for path in files:
        try:
            with Image.open(path) as im:
                im.size
            good.append(path)
        except (UnidentifiedImageError, OSError):
            continue
    if len(good) < len(files):
        log.warning("skipped %d of %d files that are not readable images", len(files) - len(good), len(files))
    if not good:
        raise DataError("none of the image files could be read")
    return good


def in_validation(path: Path, root: Path, fraction: float) -> bool:
    """Deterministic split by file name: stable across machines and when files are added."""
    digest = hashlib.md5(path.relative_to(root).as_posix().encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def photo_transform(image_size: int):
    """PIL image -> (3, S, S) tensor in [-1, 1]: resize the short side, center-crop."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(image_size, antialias=True),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit and 32-bit greys scaled to 8 bits (convert("RGB") would saturate them to
    white), float greys read as [0, 1], palettes and alpha composited on white, CMYK and the rest converted."""
    if im.mode.startswith("I") or im.mode == "F":
        grey = np.asarray(im, dtype=np.float64) / (1.0 if im.mode == "F" else 65535.0)
        im = Image.fromarray((np.clip(grey, 0, 1) * 255 + 0.5).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return im.convert("RGB")


class ImageFolder(Dataset):
    """Center-cropped, resized RGB images from a folder tree; labels from top-level sub-folders if asked."""

    def __init__(self, files: list[Path], root: Path, image_size: int, class_names: list[str] | None = None):
        self.files, self.root = files, root
        self.class_index = {name: i for i, name in enumerate(class_names or [])}
        self.transform = photo_transform(image_size)
        self.warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def label(self, i: int) -> int:
        """Index of the file's top-level sub-folder, or 0 without classes."""
        if not self.class_index:
            return 0
        return self.class_index[self.files[i].relative_to(self.root).parts[0]]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # A file that passed the header check but fails to decode (truncated) is replaced by its
        # neighbour, with a warning, so a long run never dies mid-epoch on one bad file.
        for j in range(i, i + len(self.files)):
            j %= len(self.files)
            try:
                with Image.open(self.files[j]) as im:
                    return self.transform(to_rgb(im)), self.label(j)
            except OSError as e:
                if j not in self.warned:
                    self.warned.add(j)
                    log.warning("skipping unreadable image %s (%s)", self.files[j], e)
        raise DataError("no image in the folder could be decoded")


def image_folder_splits(
    root: str | Path, image_size: int, val_fraction: float, class_from_folders: bool = False
) -> tuple[ImageFolder, ImageFolder | None, list[str] | None]:
    """(train, validation or None, class names or None) for a folder of images."""
    root = Path(root)
    files = readable(find_images(root))
    class_names = None
    if class_from_folders:
        class_names = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
        if not class_names:
            raise DataError(f"--class-from-folders needs images in sub-folders of {root} (one folder per class)")
        files = [f for f in files if len(f.relative_to(root).parts) > 1]
    val = [f for f in files if in_validation(f, root, val_fraction)]
    train = [f for f in files if not in_validation(f, root, val_fraction)]
    if not train:
        raise DataError(f"--val-fraction {val_fraction} leaves no training images out of {len(files)}")
    log.info("%d training and %d validation images from %s", len(train), len(val), root)
    val_set = ImageFolder(val, root, image_size, class_names) if val else None
    return ImageFolder(train, root, image_size, class_names), val_set, class_names


class Unlabelled(Dataset):
    """Wrap a data set of (image, anything) as (image, 0)."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.data[i][0], 0


def load_celeba(root: str | Path, image_size: int) -> tuple[Dataset, Dataset, None]:
    """CelebA's official train/valid splits through torchvision (root/celeba/img_align_celeba + list files)."""
    from torchvision.datasets import CelebA

    try:
        splits = [CelebA(str(root), split=s, target_type=[], transform=photo_transform(image_size))
                  for s in ("train", "valid")]
    except (RuntimeError, OSError) as e:
        raise DataError(
            f"CelebA not found under {root}/celeba ({str(e).splitlines()[0]}): it needs img_align_celeba/ and "
            "list_eval_partition.txt there; or use --dataset folder --data-root path/to/img_align_celeba"
        ) from e
    return Unlabelled(splits[0]), Unlabelled(splits[1]), None


class Batch(NamedTuple):
    """A training batch on the device: images x (B, C, H, W) in [-1, 1] and labels y (B,) or None; for reflow pairs
    also the noise x0 each image was drawn from, and with `pairs --states` its path on the parent's grid
    (B, K + 1, C, H, W), which meanflow then regresses on."""

    x: torch.Tensor
    y: torch.Tensor | None
    x0: torch.Tensor | None = None
    path: torch.Tensor | None = None


class ShardedSampler(torch.utils.data.Sampler[int]):
    """A fresh permutation per epoch from (seed, epoch), split over ranks, that can start mid-epoch. Plays the role of
    DistributedSampler + set_epoch, and also lets a resumed run skip the batches it already trained on without loading
    them."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.batches = size // world // batch_size  # per rank and epoch; the remainder is dropped
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * self.batch_size

    def __iter__(self):
        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = perm[self.rank::self.world][: self.batches * self.batch_size]
        return iter(mine[self.start_batch * self.batch_size:].tolist())
