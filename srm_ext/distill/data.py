"""Datasets for the experiments and the loaders that feed them.

Every dataset yields ``(uint8 image (C, H, W), int label)``; normalisation and
augmentation run batched on the device (:class:`BatchPreprocessor`), which is
cheaper than per-sample transforms on a CPU with few cores.

Formats:

* ``digits``: scikit-learn's 8x8 handwritten digits (bundled, no download),
  as-is or upsampled to ``image_size``; fixed stratified 80/20 split.
* ``cifar10`` / ``cifar100``: the python-pickle folders (``data_batch_1..5`` and
  ``test_batch``, or ``train`` and ``test``; keys ``b"data"`` and ``b"labels"`` /
  ``b"fine_labels"``).
* ``imagefolder``: ``root/<class>/<image>`` (split 80/20), or split folders
  ``root/train/<class>/...`` with a held-out ``root/test``, ``val``, ``valid`` or
  ``validation`` (the first present, in that order); read with Pillow. A root with
  any folder named like a split holds splits, and then nothing else.
* ``npz``: arrays ``images`` and ``labels`` (split 80/20), optionally with
  ``test_images``/``test_labels``; or ``x_train``, ``y_train``, ``x_test``,
  ``y_test``. Images (N, H, W), (N, H, W, C) or (N, C, H, W), uint8, uint16 or floats
  in [0, 1], the same size and channels in both splits; labels 1-D non-negative class
  indices, one per image, at most half of the indices 0..max unused.

Every dataset needs at least two classes in its training set. ``image_size``
resizes any of them (bilinear; antialiased when shrinking).

Images with more than 8 bits (uint16 arrays, 16-bit greyscale PNGs) are scaled by
their full range and rounded to uint8.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from .config import ConfigError, ExperimentConfig
from .interrupt_safe_loader import InterruptSafeDataLoader
from .safe_pickle import load_data_pickle
from .distributed import DistributedContext

__all__ = [
    "DatasetSplits",
    "ImageFolderDataset",
    "BatchPreprocessor",
    "InputNormalization",
    "load_dataset",
    "load_digits",
    "load_cifar",
    "load_npz",
    "load_imagefolder",
    "resize_splits",
    "make_loaders",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
HELD_OUT_SPLITS = ("test", "val", "valid", "validation")  # in order of preference
# Labels at or above this are no class indices (numpy's uint64 or float labels
# could pass int64's range).
_MAX_CLASSES = 2**31
# Folder names (any case) that mark an ImageFolder root as holding splits, not classes.
SPLIT_NAMES = frozenset({"train", "training", "testing", *HELD_OUT_SPLITS})
SPLIT_SEED = 0  # the held-out split never depends on the experiment seed


@dataclass
class DatasetSplits:
    """Train and held-out sets with what the models and preprocessing need."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    natural_images: bool  # horizontal flips are label-preserving
    # The name of each class, by label, where the data names them.
    class_names: tuple[str, ...] | None = None


class ImageFolderDataset(Dataset):
    """Images under ``root/<class>/``, read lazily with Pillow, converted to RGB and
    resized to ``size`` x ``size``; 16-bit greyscale images are scaled by 65535,
    float ones (in [0, 1]) by 1."""

    def __init__(
        self, files: list[Path], labels: list[int], size: int, root: Path | None = None
    ) -> None:
        # The tree the files are in, which names them in the dataset's
        # fingerprint; by default the folder they all lie under.
        if root is None:
            root = Path(os.path.commonpath([path.parent for path in files] or ["."]))
        self.root = root
        self.files = files
        self.labels = labels
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as image:
                if image.mode.startswith("I"):
                    # 16-bit greyscale (modes I;16*, I): convert("RGB") would clip at 255.
                    image = Image.fromarray(_16bit_image_to_uint8(image, path))
                elif image.mode == "F":
                    # Float greyscale (TIFF): convert("RGB") would truncate to whole numbers.
                    image = Image.fromarray(_float_image_to_uint8(image, path))
                image = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except ConfigError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            # Pillow's messages ("Truncated File Read") do not say which file.
            raise ConfigError(f"{str(path)!r}: not a readable image ({exc})") from None
        return torch.from_numpy(array.copy()).permute(2, 0, 1), self.labels[index]


def _16bit_image_to_uint8(image, path: Path) -> np.ndarray:
    array = np.asarray(image)
    lo, hi = int(array.min()), int(array.max())
    if lo < 0 or hi > 65535:
        raise ConfigError(
            f"{str(path)!r}: mode {image.mode} image has values in [{lo}, {hi}]; "
            "expected 16-bit values in [0, 65535]"
        )
    return _uint16_to_uint8(array)


def _float_image_to_uint8(image, path: Path) -> np.ndarray:
    array = np.asarray(image)
    if not (np.isfinite(array).all() and 0 <= array.min() <= array.max() <= 1):
        raise ConfigError(
            f"{str(path)!r}: float image has values in [{array.min():.4g}, {array.max():.4g}]; "
            "expected values in [0, 1]"
        )
    return _unit_floats_to_uint8(array)


def _unit_floats_to_uint8(array: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] as 8-bit values, rounded to the nearest."""
    return np.rint(array.astype(np.float32) * 255).astype(np.uint8)


def _uint16_to_uint8(array: np.ndarray) -> np.ndarray:
    # round(v * 255 / 65535) = round(v / 257), exactly, in integers.
    return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)


class InputNormalization(nn.Module):
    """Scales uint8 images to [0, 1] (float images are taken as already there)
    and normalises each channel: the input side of every model a run trains."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std


class BatchPreprocessor:
    """Scales uint8 batches to [0, 1], normalises per channel and, for training
    batches, applies random translations (pad-and-crop) and optional flips. Random
    draws use the global torch generator, which checkpoints save and restore."""

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = True,
        pad: int = 2,
        flip: bool = False,
    ) -> None:
        self.normalize = InputNormalization(mean, std)
        self.augment = augment
        self.pad = pad
        self.flip = flip

    def __call__(self, images: Tensor, train: bool) -> Tensor:
        x = self.normalize.to(images.device)(images)  # moves its buffers once
        if train and self.augment:
            x = self._translate(x)
            if self.flip:
                flip = torch.rand(x.shape[0]) < 0.5
                x[flip.to(x.device)] = x[flip.to(x.device)].flip(-1)
        return x

    def _translate(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p))
        dy, dx = torch.randint(0, 2 * p + 1, (2, n)).tolist()
        return torch.stack([padded[i, :, y : y + h, z : z + w] for i, (y, z) in enumerate(zip(dy, dx))])


# --------------------------------------------------------------------------- loading


def load_dataset(config: ExperimentConfig) -> DatasetSplits:
    """The dataset ``config`` names, with ``train_limit``/``test_limit`` applied
    and the input statistics ``input_mean``/``input_std`` where given."""
    name = config.dataset
    if name == "digits":
        if config.data_path:
            raise ConfigError(
                "the digits dataset is built in and reads no --data-path; name the format of "
                f"{config.data_path!r} with --dataset cifar10, cifar100, imagefolder or npz"
            )
        splits = load_digits(config.image_size or 8)
    else:
        if not config.data_path:
            raise ConfigError(f"dataset {name!r} needs --data-path")
        path = Path(config.data_path)
        if not path.exists():
            raise ConfigError(f"data path {str(path)!r} does not exist")
        if name in ("cifar10", "cifar100"):
            splits = load_cifar(path, num_classes=10 if name == "cifar10" else 100)
        elif name == "npz":
            splits = load_npz(path, config.image_size)
        elif name == "imagefolder":
            _check_output_outside_tree(Path(config.output_dir), path)
            splits = load_imagefolder(
                path, config.image_size or 32, skip_unreadable=config.check_images
            )
        else:
            raise ConfigError(
                f"unknown dataset {name!r}; use digits, cifar10, cifar100, imagefolder or npz"
            )
        if config.image_size:  # CIFAR loads at its stored size
            splits = resize_splits(splits, config.image_size)
    # Spread over each split, which may list its images class by class.
    if config.train_limit:
        splits.train = Subset(splits.train, _spread_sample(len(splits.train), config.train_limit))
        _require_two_classes(_labels(splits.train), f"--train-limit {config.train_limit}")
    if config.test_limit:
        splits.test = Subset(splits.test, _spread_sample(len(splits.test), config.test_limit))
    for name in ("mean", "std"):
        given = getattr(config, f"input_{name}")
        if given is None:
            continue
        if len(given) != splits.in_channels:
            raise ConfigError(
                f"--input-{name} gives {len(given)} value(s) but the images have "
                f"{splits.in_channels} channel(s)"
            )
        setattr(splits, name, tuple(float(v) for v in given))
    return splits


def resize_splits(splits: DatasetSplits, image_size: int) -> DatasetSplits:
    """In-memory splits (CIFAR, npz) with their images resized to
    ``image_size`` x ``image_size``, and the input statistics recomputed."""
    if image_size == splits.image_size:
        return splits
    train, test = (_resized_tensor_dataset(split, image_size) for split in (splits.train, splits.test))
    mean, std = _channel_stats(train.tensors[0])
    return dataclasses.replace(
        splits, train=train, test=test, image_size=image_size, mean=mean, std=std
    )


def _resized_tensor_dataset(dataset: Dataset, size: int) -> TensorDataset:
    if not isinstance(dataset, TensorDataset):
        raise TypeError(f"resizing needs images held in a TensorDataset, got {type(dataset).__name__}")
    images, labels = dataset.tensors
    return TensorDataset(_resized_images(images, size), labels)


def _resized_images(images: Tensor, size: int) -> Tensor:
    """uint8 images (N, C, H, W) of any H x W resized to ``size`` x ``size``."""
    if images.shape[-2:] == (size, size):
        return images
    resized = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    # Converted a chunk at a time: the whole set as float would take 4x the memory.
    for start in range(0, len(images), 1024):
        chunk = images[start : start + 1024].float()
        chunk = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False,
            antialias=size < max(images.shape[-2:]),  # downsampling without it aliases
        )
        resized[start : start + 1024] = chunk.round().clamp(0, 255).to(torch.uint8)
    return resized


def load_digits(image_size: int = 8) -> DatasetSplits:
    """scikit-learn's digits (1797 grey 8x8 images, values 0..16)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16.0
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear")
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    splits = _split_arrays(images, torch.from_numpy(bunch.target).long(), False, "digits")
    return dataclasses.replace(splits, class_names=tuple(str(n) for n in bunch.target_names))


def load_cifar(root: Path, num_classes: int = 10) -> DatasetSplits:
    """CIFAR-10 (num_classes=10) or CIFAR-100 (100) from the python-pickle folder."""
    names = [p.name for p in root.iterdir()] if root.is_dir() else []
    if "test_batch" in names:
        train_files = _cifar_training_batches(root, names)
        test_files = ["test_batch"]
    elif "train" in names and "test" in names:
        train_files, test_files = ["train"], ["test"]
    else:
        raise ConfigError(
            f"{str(root)!r} is not a CIFAR python folder (expected data_batch_1..5 and "
            "test_batch, or train and test)"
        )
    label_key = b"labels" if num_classes == 10 else b"fine_labels"
    train_x, train_y = _read_cifar_batches(root, train_files, label_key)
    test_x, test_y = _read_cifar_batches(root, test_files, label_key)
    low, high = int(min(train_y.min(), test_y.min())), int(max(train_y.max(), test_y.max()))
    if low < 0 or high >= num_classes:
        hint = " (a CIFAR-100 folder? use --dataset cifar100)" if num_classes == 10 and high < 100 else ""
        raise ConfigError(
            f"{str(root)!r} has labels in [{low}, {high}], outside the {num_classes} classes "
            f"of CIFAR-{num_classes}{hint}"
        )
    splits = _splits_from_tensors(
        train_x, train_y, test_x, test_y, num_classes, True, repr(str(root))
    )
    return dataclasses.replace(splits, class_names=_cifar_class_names(root, num_classes))


def _cifar_training_batches(root: Path, names: list[str]) -> list[str]:
    """The ``data_batch_<i>`` files in order of ``i``, which must run from 1 without
    a gap: a lost batch would shrink the training set without a word. Other
    names (``data_batch_1.bak``, ``data_batch_01``) are not batches."""
    numbers = sorted(
        int(m[1]) for name in names if (m := re.fullmatch(r"data_batch_([1-9][0-9]*)", name))
    )
    if not numbers:
        raise ConfigError(f"{str(root)!r} has test_batch but no data_batch_<i> files")
    missing = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
    if missing:
        listed = ", ".join(f"data_batch_{i}" for i in missing)
        raise ConfigError(
            f"{str(root)!r} has data_batch_{numbers[-1]} but lacks {listed}; expected "
            "data_batch_1 to data_batch_N (CIFAR has 1..5)"
        )
    return [f"data_batch_{i}" for i in numbers]


def _cifar_class_names(root: Path, num_classes: int) -> tuple[str, ...] | None:
    """The class names of CIFAR's ``batches.meta`` (CIFAR-10) or ``meta``
    (CIFAR-100); None where that file is absent or does not list one name per
    class. The names only label the results, so such a file is not refused."""
    path, key = (
        (root / "batches.meta", b"label_names") if num_classes == 10
        else (root / "meta", b"fine_label_names")
    )
    if not path.is_file():
        return None
    try:
        meta = load_data_pickle(path)
    except ConfigError:
        return None
    names = _with_bytes_keys(meta).get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != num_classes:
        return None
    decoded = _decoded(names)
    return decoded if all(isinstance(n, str) for n in decoded) else None


def _with_bytes_keys(batch: dict) -> dict:
    """A CIFAR dict keyed as the Python 2 pickles are (b"data"): a file
    pickled again by Python 3 has str keys."""
    return {key.encode() if isinstance(key, str) else key: value for key, value in batch.items()}


def _read_cifar_batches(root: Path, files: list[str], label_key: bytes) -> tuple[Tensor, Tensor]:
    """Images and labels of CIFAR batch ``files``; ``label_key`` tells CIFAR-10's
    ``b"labels"`` from CIFAR-100's ``b"fine_labels"``."""
    other_key, other_classes = (b"fine_labels", 100) if label_key == b"labels" else (b"labels", 10)
    images, labels = [], []
    for name in files:
        path = root / name
        batch = load_data_pickle(path)
        if not isinstance(batch, dict):
            raise ConfigError(f"{path} does not hold a CIFAR batch dict")
        batch = _with_bytes_keys(batch)
        if label_key not in batch and other_key in batch:
            raise ConfigError(
                f"{path} holds {other_key!r}, not {label_key!r}: a CIFAR-{other_classes} "
                f"batch? use --dataset cifar{other_classes}"
            )
        if b"data" not in batch or label_key not in batch:
            raise ConfigError(f"{path} lacks b'data' or {label_key!r}")
        x, y = _cifar_arrays(batch[b"data"], batch[label_key], path, label_key)
        images.append(x)
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _cifar_arrays(data, labels, path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        x, y = np.asarray(data), np.asarray(labels)
    except ValueError as exc:  # ragged nested lists
        raise ConfigError(f"{path}: b'data' or {label_key!r} is not an array ({exc})") from None
    if x.ndim < 2 or x.shape[1:] not in ((3072,), (3, 32, 32)) or not len(x):
        raise ConfigError(
            f"{path}: b'data' has shape {x.shape}; expected (N, 3072) with N >= 1, "
            "one row of 3x32x32 pixels per image"
        )
    if x.dtype != np.uint8:
        # np.asarray(..., uint8) would wrap or truncate anything but whole 0..255 values.
        whole = x.dtype.kind in "iuf" and 0 <= x.min() <= x.max() <= 255 and np.all(x % 1 == 0)
        if not whole:
            raise ConfigError(f"{path}: b'data' must hold 8-bit pixel values 0..255; got {x.dtype}")
    if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu":
        raise ConfigError(
            f"{path}: {label_key!r} has shape {y.shape} ({y.dtype}) for {len(x)} images; "
            "expected one integer label per image"
        )
    return x.astype(np.uint8).reshape(-1, 3, 32, 32), y.astype(np.int64)


def load_npz(path: Path, image_size: int | None = None) -> DatasetSplits:
    """An .npz of images and labels; with ``image_size``, its images (of any
    size, square or not) resized to ``image_size`` x ``image_size``."""
    try:
        return _load_npz(path, image_size)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{str(path)!r} is not a readable .npz file ({exc})") from None


def _load_npz(path: Path, image_size: int | None) -> DatasetSplits:
    if path.is_file() and not zipfile.is_zipfile(path):
        # A single .npy, or no numpy file at all, which np.load would try as a
        # pickle and blame "pickled (object) data".
        raise ConfigError(f"{str(path)!r} is not an .npz archive (a zip file of .npy arrays)")
    with np.load(path) as arrays:
        keys = set(arrays.files)
        if {"x_train", "y_train", "x_test", "y_test"} <= keys:
            pairs = [("x_train", "y_train"), ("x_test", "y_test")]
        elif {"images", "labels"} <= keys:
            pairs = [("images", "labels")]
            held_out = {"test_images", "test_labels"} & keys
            if len(held_out) == 1:
                # Else the held-out set would silently be a split of the training images.
                (present,) = held_out
                raise ConfigError(
                    f"{str(path)!r} holds {present} but not "
                    f"{'test_labels' if present == 'test_images' else 'test_images'}; "
                    "expected both (the held-out set) or neither (20% of images is held out)"
                )
            if held_out:
                pairs.append(("test_images", "test_labels"))
        else:
            raise ConfigError(
                f"{str(path)!r} must hold arrays images and labels (or x_train, y_train, "
                f"x_test, y_test); found {', '.join(sorted(keys)) or 'none'}"
            )
        images, labels, shapes = [], [], []
        for image_key, label_key in pairs:
            array = arrays[image_key]
            shapes.append(f"{image_key} has shape {array.shape}")
            if array.ndim and not len(array):
                raise ConfigError(f"{image_key} in {str(path)!r} is empty; expected images")
            images.append(_to_uint8_nchw(array, path, image_key))
            labels.append(_npz_labels(arrays[label_key], path, label_key))
            if len(labels[-1]) != len(images[-1]):
                raise ConfigError(
                    f"{str(path)!r}: {label_key} has {len(labels[-1])} labels but {image_key} "
                    f"has {len(images[-1])} images; expected one label per image"
                )
        names = _npz_class_names(arrays, path) if "class_names" in keys else None
    if image_size:
        images = [_resized_images(split, image_size) for split in images]
    where = repr(str(path))
    natural = images[0].shape[1] == 3
    if len(images) == 1:
        splits = _split_arrays(images[0], labels[0], natural, where)
    elif images[0].shape[1:] != images[1].shape[1:]:
        raise ConfigError(
            f"{where}: {shapes[0]} but {shapes[1]}; expected images of the same size and "
            "channels in both"
        )
    else:
        num_classes = _num_classes(torch.cat(labels), where)
        splits = _splits_from_tensors(
            images[0], labels[0], images[1], labels[1], num_classes, natural, where
        )
    if names is not None and len(names) != splits.num_classes:
        raise ConfigError(
            f"{where}: class_names has {len(names)} names for the labels' "
            f"{splits.num_classes} classes; expected one name per class"
        )
    return dataclasses.replace(splits, class_names=names)


def _npz_class_names(arrays: np.lib.npyio.NpzFile, path: Path) -> tuple[str, ...]:
    """An npz's optional ``class_names``: one string per class, by label."""
    expected = "expected one string per class, as np.savez stores a list of str"
    try:
        array = arrays["class_names"]
    except ValueError:  # an object array, which would need unpickling
        raise ConfigError(
            f"class_names in {str(path)!r} is an array of objects; {expected}"
        ) from None
    if array.ndim != 1 or array.dtype.kind not in "US":
        raise ConfigError(
            f"class_names in {str(path)!r} has shape {array.shape} ({array.dtype}); {expected}"
        )
    return _decoded(array.tolist())


def _decoded(names: list) -> tuple:
    """Class names as str: pickles of Python 2 and numpy's "S" arrays hold bytes."""
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


def _to_uint8_nchw(array: np.ndarray, path: Path, key: str) -> Tensor:
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[1] not in (1, 3) and array.shape[-1] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ConfigError(
            f"{key} in {str(path)!r} have shape {array.shape}; expected (N, H, W), "
            "(N, H, W, C) or (N, C, H, W) with 1 or 3 channels"
        )
    # Datasets are held as uint8 to save memory: 16-bit images are rounded to 8 bits.
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # either byte order
        array = _uint16_to_uint8(array)
    elif array.dtype.kind == "f" and (array.size == 0 or 0 <= array.min() <= array.max() <= 1):
        array = _unit_floats_to_uint8(array)
    elif array.dtype.kind in "iu" and array.size and 0 <= array.min() <= array.max() <= 255:
        array = array.astype(np.uint8)  # 8-bit values in a wider type (numpy's default int64)
    elif array.dtype != np.uint8:
        got = str(array.dtype)
        if array.size and array.dtype.kind in "iuf":
            got += f" in [{array.min():.4g}, {array.max():.4g}]"
        raise ConfigError(
            f"{key} in {str(path)!r}: images must be uint8, uint16, integers in [0, 255] "
            f"or float in [0, 1]; got {got}"
        )
    return torch.from_numpy(np.ascontiguousarray(array))


def _npz_labels(labels: np.ndarray, path: Path, key: str) -> Tensor:
    where = f"{key} in {str(path)!r}"
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # a column vector of indices
    if labels.ndim != 1:
        raise ConfigError(
            f"{where} have shape {labels.shape}; labels must be 1-D integer class indices, "
            "not one-hot"
        )
    # Whole-valued floats are accepted: several tools save class indices as floats.
    whole = labels.dtype.kind == "f" and bool(np.all(np.mod(labels, 1) == 0))
    if labels.dtype.kind not in "biu" and not whole:
        raise ConfigError(f"{where} are {labels.dtype}; labels must be integer class indices")
    if len(labels) and labels.min() < 0:
        raise ConfigError(f"{where}: labels must be >= 0; found {labels.min():g}")
    if len(labels) and labels.max() >= _MAX_CLASSES:
        # int64 would wrap the largest, and no classifier has this many outputs.
        raise ConfigError(
            f"{where}: labels must be class indices below {_MAX_CLASSES}; found {labels.max():g}"
        )
    return torch.from_numpy(labels.astype(np.int64))


def _check_output_outside_tree(output_dir: Path, root: Path) -> None:
    """A run's output directory inside the image tree would be read as one of
    its classes (its plots are images) on the next run, and would change the
    tree's fingerprint with every checkpoint. A hidden one is not read."""
    out, tree = output_dir.resolve(), root.resolve()
    if out != tree and tree not in out.parents:
        return
    if any(_hidden(part) for part in out.relative_to(tree).parts):
        return
    raise ConfigError(
        f"the output directory {str(output_dir)!r} lies inside the image tree {str(root)!r}, "
        "whose folders are its classes: choose an --output-dir outside it"
    )


def load_imagefolder(
    root: Path, image_size: int = 32, skip_unreadable: bool = False
) -> DatasetSplits:
    """An image tree, read lazily. Its channel statistics come from a sample
    of training images, read now: an unreadable one fails the load, or with
    ``skip_unreadable`` is passed over, for ``check_images`` to list with
    every other."""
    if not root.is_dir():
        raise ConfigError(f"{str(root)!r} is not a directory")
    splits = _split_folders(root)
    if splits:
        train_dir, test_dir = splits
        classes = _class_names(train_dir)
        missing = sorted(set(_class_names(test_dir)) - set(classes))
        if missing:
            raise ConfigError(
                f"{str(test_dir)!r} has classes {', '.join(missing)} that {str(train_dir)!r} "
                "lacks; expected every held-out class to be a training class"
            )
        train = _folder_dataset(train_dir, classes, image_size)
        # The held-out split may lack a class, or hold no folder for it.
        test = _folder_dataset(test_dir, classes, image_size, every_class=False)
        _require_two_classes(torch.tensor(train.labels), repr(str(train_dir)), classes)
    else:
        classes = _class_names(root)
        full = _folder_dataset(root, classes, image_size)
        _require_two_classes(torch.tensor(full.labels), repr(str(root)), classes)
        train_idx, test_idx = _stratified_split(torch.tensor(full.labels))
        train, test = Subset(full, train_idx), Subset(full, test_idx)
        # Classes of one image each may all land in the held-out 20%.
        _require_two_classes(_labels(train), f"{str(root)!r} less its held-out 20%", classes)
    images = []
    for index in _spread_sample(len(train), _STATS_SAMPLE):
        try:
            images.append(train[index][0])
        except ConfigError:
            if not skip_unreadable:
                raise
    if not images:
        raise ConfigError(f"no training image under {str(root)!r} can be read")
    mean, std = _channel_stats(torch.stack(images))
    return DatasetSplits(
        train, test, len(classes), 3, image_size, mean, std, natural_images=True,
        class_names=tuple(classes),
    )


# Images decoded to estimate an image folder's channel statistics: reading a
# large tree whole would take longer than a short run's training.
_STATS_SAMPLE = 512


def _spread_sample(count: int, size: int) -> list[int]:
    """Up to ``size`` indices spread evenly over ``count`` items: an image tree
    lists its images class by class, so a prefix would see the first classes only."""
    if count <= size:
        return list(range(count))
    return torch.linspace(0, count - 1, size).round().long().tolist()


def _labels(dataset: Dataset) -> Tensor:
    """The class labels of a split, read without loading its images."""
    if isinstance(dataset, Subset):
        return _labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    return torch.as_tensor(dataset.labels)


def _split_folders(root: Path) -> tuple[Path, Path] | None:
    """The (train, held-out) folders when ``root`` holds splits; None when its folders
    are classes. Any folder named like a split makes ``root`` hold splits, so that
    ``train/`` beside an unknown sibling is refused, not taken as two classes."""
    folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir() and not _hidden(p.name)}
    if not SPLIT_NAMES & folders.keys():
        return None
    held_out = [folders[name] for name in HELD_OUT_SPLITS if name in folders]
    others = set(folders) - {"train", *HELD_OUT_SPLITS}
    if "train" not in folders or not held_out or others:
        found = ", ".join(sorted(p.name + "/" for p in folders.values()))
        raise ConfigError(
            f"{str(root)!r} holds folders {found}; expected class folders root/<class>/<image>, "
            "or split folders train/<class>/<image> and test/, val/, valid/ or validation/ "
            "(the first present is held out) and no others"
        )
    return folders["train"], held_out[0]


def _hidden(name: str) -> bool:
    # .ipynb_checkpoints, macOS ._* resource forks and the like.
    return name.startswith(".")


def _class_names(root: Path) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
    if not classes:
        raise ConfigError(f"{str(root)!r} has no class folders (expected root/<class>/<image>)")
    return classes


def _visible_files(folder: Path) -> list[Path]:
    """The files under ``folder`` but hidden ones and those in hidden folders,
    sorted. Symlinked folders are followed (``Path.rglob`` skips them before
    Python 3.13), but not into a folder read before or one that holds
    ``folder``: a link back up would read its images again, or other classes'."""
    top = os.path.realpath(folder) + os.sep
    files, visited = [], set()
    for directory, subfolders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited or (visited and top.startswith(real + os.sep)):
            subfolders.clear()
            continue
        visited.add(real)
        subfolders[:] = [name for name in subfolders if not _hidden(name)]
        files += [Path(directory, name) for name in names if not _hidden(name)]
    return sorted(files)


def _folder_dataset(
    root: Path, classes: list[str], size: int, every_class: bool = True
) -> ImageFolderDataset:
    """The images under ``root/<class>/``. With ``every_class``, a class folder
    without images is refused: it would be a class the models must output but
    never see."""
    files, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = [f for f in _visible_files(root / name) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not found and (root / name).is_dir():
            empty.append(name)
        files += found
        labels += [label] * len(found)
    if not files:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}")
    if every_class and empty:
        raise ConfigError(
            f"{str(root)!r}: class folder(s) {', '.join(empty)} hold no images "
            f"({', '.join(IMAGE_SUFFIXES)}); remove them or add their images"
        )
    return ImageFolderDataset(files, labels, size, root)


# --------------------------------------------------------------------------- helpers


def _stratified_split(labels: Tensor, test_fraction: float = 0.2) -> tuple[list[int], list[int]]:
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    counts = torch.bincount(labels)
    counts = counts[counts > 0]
    n_test = math.ceil(test_fraction * len(labels))
    # Stratifying needs two images of every class and room for each in both splits.
    can_stratify = counts.min() >= 2 and len(counts) <= min(n_test, len(labels) - n_test)
    stratify = labels.numpy() if can_stratify else None
    train_idx, test_idx = train_test_split(
        indices, test_size=test_fraction, random_state=SPLIT_SEED, stratify=stratify
    )
    return sorted(train_idx.tolist()), sorted(test_idx.tolist())


def _split_arrays(images: Tensor, labels: Tensor, natural: bool, where: str) -> DatasetSplits:
    _require_two_classes(labels, where)  # also refuses one image, which cannot be split
    num_classes = _num_classes(labels, where)
    train_idx, test_idx = _stratified_split(labels)
    return _splits_from_tensors(
        images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
        num_classes, natural, where,
    )


def _num_classes(labels: Tensor, where: str) -> int:
    """Labels are class indices, so the classifier has max + 1 outputs. Refused when
    most of those would have no examples ({0, 500, 100000} is not 100001 classes)."""
    count, used = int(labels.max()) + 1, len(labels.unique())
    if count > 2 * used:
        raise ConfigError(
            f"{where}: labels are class indices, so labels up to {count - 1} make {count} "
            f"classes, but only {used} distinct labels occur; expected at most as many unused "
            f"class indices as used ones (renumber the labels 0..{used - 1})"
        )
    return count


def _require_two_classes(labels: Tensor, where: str, names: list[str] | None = None) -> None:
    present = labels.unique().tolist()
    if len(present) < 2:
        found = ", ".join(names[i] if names else str(i) for i in present)
        raise ConfigError(
            f"{where}: every training image has the same class ({found}); "
            "expected at least 2 classes"
        )


def _splits_from_tensors(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    natural: bool,
    where: str,
) -> DatasetSplits:
    _require_two_classes(train_y, where)
    height, width = train_x.shape[-2:]
    if height != width:
        # The run's image size (augmentation, config.json, load_trained_model)
        # is one side: S x S.
        raise ConfigError(
            f"{where}: the images are {height}x{width}; expected square images (crop or pad "
            "them to SxS, or resize them with --image-size S)"
        )
    mean, std = _channel_stats(train_x)
    return DatasetSplits(
        train=TensorDataset(train_x, train_y),
        test=TensorDataset(test_x, test_y),
        num_classes=num_classes,
        in_channels=train_x.shape[1],
        image_size=train_x.shape[-1],
        mean=mean,
        std=std,
        natural_images=natural,
    )


def _channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # Divided in place: one float copy of the (uint8) images, not two.
    x = images.to(torch.float32, copy=True).div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def make_loaders(
    splits: DatasetSplits,
    batch_size: int,
    seed: int,
    context: DistributedContext | None = None,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Train loader sharded over processes and reshuffled reproducibly per epoch
    (``DistributedSampler`` with ``seed``; ``set_epoch`` is called by the trainer),
    and an ordered held-out loader giving each process every ``world_size``-th
    sample, without padding, so that counts summed over processes are exact
    (``accuracy(..., context=...)``). ``batch_size`` is the global batch."""
    context = context or DistributedContext()
    if batch_size % context.world_size:
        raise ConfigError(
            f"batch size {batch_size} is not divisible by the {context.world_size} processes"
        )
    # DistributedSampler with one replica is a seeded per-epoch shuffle, so single-
    # and multi-process runs draw the same global batches.
    sampler = DistributedSampler(
        splits.train, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=seed
    )
    train = InterruptSafeDataLoader(
        splits.train,
        batch_size=batch_size // context.world_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=len(splits.train) > batch_size,  # no 1-sample BatchNorm batches
        # Own generators: creating an iterator draws a seed, which would otherwise
        # come from the global RNG and make results depend on how often we evaluate.
        generator=torch.Generator().manual_seed(seed),
    )
    test = InterruptSafeDataLoader(
        splits.test,
        batch_size=max(batch_size, 256),
        sampler=range(context.rank, len(splits.test), context.world_size),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    return train, test
