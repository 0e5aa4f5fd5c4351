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
* ``imagefolder``: ``root/<class>/<image>`` (split 80/20) or
  ``root/train/<class>/...`` with ``root/test`` (or ``val``); read with Pillow.
* ``npz``: arrays ``images`` and ``labels`` (split 80/20), optionally with
  ``test_images``/``test_labels``; or ``x_train``, ``y_train``, ``x_test``,
  ``y_test``. Images (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 or floats in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from .config import ConfigError, ExperimentConfig
from .safe_pickle import load_data_pickle
from .distributed import DistributedContext

__all__ = [
    "DatasetSplits",
    "ImageFolderDataset",
    "BatchPreprocessor",
    "load_dataset",
    "load_digits",
    "load_cifar",
    "load_npz",
    "load_imagefolder",
    "make_loaders",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
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


class ImageFolderDataset(Dataset):
    """Images under ``root/<class>/``, read lazily with Pillow, converted to RGB and
    resized to ``size`` x ``size``."""

    def __init__(self, files: list[Path], labels: list[int], size: int) -> None:
        self.files = files
        self.labels = labels
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        with Image.open(self.files[index]) as image:
            image = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1), self.labels[index]


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
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.augment = augment
        self.pad = pad
        self.flip = flip

    def __call__(self, images: Tensor, train: bool) -> Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
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
    """The dataset ``config`` names, with ``train_limit``/``test_limit`` applied."""
    name = config.dataset
    if name == "digits":
        splits = load_digits(config.image_size or 8)
    else:
        if not config.data_path:
            raise ConfigError(f"dataset {name!r} needs --data-path")
        path = Path(config.data_path)
        if not path.exists():
            raise ConfigError(f"data path {str(path)!r} does not exist")
        if name in ("cifar10", "cifar100"):
            splits = load_cifar(path)
        elif name == "npz":
            splits = load_npz(path)
        elif name == "imagefolder":
            splits = load_imagefolder(path, config.image_size or 32)
        else:
            raise ConfigError(
                f"unknown dataset {name!r}; use digits, cifar10, cifar100, imagefolder or npz"
            )
    if config.train_limit:
        splits.train = Subset(splits.train, range(min(config.train_limit, len(splits.train))))
    if config.test_limit:
        splits.test = Subset(splits.test, range(min(config.test_limit, len(splits.test))))
    return splits


def load_digits(image_size: int = 8) -> DatasetSplits:
    """scikit-learn's digits (1797 grey 8x8 images, values 0..16)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16.0
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear")
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return _split_arrays(images, torch.from_numpy(bunch.target).long(), natural=False)


def load_cifar(root: Path) -> DatasetSplits:
    """CIFAR-10/100 from the python-pickle folder."""
    names = [p.name for p in root.iterdir()] if root.is_dir() else []
    if "test_batch" in names:
        train_files = sorted(p for p in names if p.startswith("data_batch_"))
        test_files = ["test_batch"]
    elif "train" in names and "test" in names:
        train_files, test_files = ["train"], ["test"]
    else:
        raise ConfigError(
            f"{str(root)!r} is not a CIFAR python folder (expected data_batch_1..5 and "
            "test_batch, or train and test)"
        )
    train_x, train_y = _read_cifar_batches(root, train_files)
    test_x, test_y = _read_cifar_batches(root, test_files)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    return _splits_from_tensors(train_x, train_y, test_x, test_y, num_classes, natural=True)


def _read_cifar_batches(root: Path, files: list[str]) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for name in files:
        batch = load_data_pickle(root / name)
        if not isinstance(batch, dict):
            raise ConfigError(f"{root / name} does not hold a CIFAR batch dict")
        label_key = b"fine_labels" if b"fine_labels" in batch else b"labels"
        if b"data" not in batch or label_key not in batch:
            raise ConfigError(f"{root / name} lacks b'data' or b'labels'/b'fine_labels'")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_npz(path: Path) -> DatasetSplits:
    with np.load(path) as arrays:
        keys = set(arrays.files)
        if {"x_train", "y_train", "x_test", "y_test"} <= keys:
            parts = [arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")]
        elif {"images", "labels"} <= keys:
            parts = [arrays["images"], arrays["labels"]]
            if {"test_images", "test_labels"} <= keys:
                parts += [arrays["test_images"], arrays["test_labels"]]
        else:
            raise ConfigError(
                f"{str(path)!r} must hold arrays images and labels (or x_train, y_train, "
                f"x_test, y_test); found {', '.join(sorted(keys)) or 'none'}"
            )
    images = [_to_uint8_nchw(a, path) for a in parts[0::2]]
    labels = [torch.from_numpy(np.asarray(a, dtype=np.int64)).reshape(-1) for a in parts[1::2]]
    natural = images[0].shape[1] == 3
    if len(images) == 1:
        return _split_arrays(images[0], labels[0], natural=natural)
    num_classes = int(max(labels[0].max(), labels[1].max())) + 1
    return _splits_from_tensors(images[0], labels[0], images[1], labels[1], num_classes, natural)


def _to_uint8_nchw(array: np.ndarray, path: Path) -> Tensor:
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[1] not in (1, 3) and array.shape[-1] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ConfigError(
            f"images in {str(path)!r} have shape {array.shape}; expected (N, H, W), "
            "(N, H, W, C) or (N, C, H, W) with 1 or 3 channels"
        )
    if array.dtype != np.uint8:
        array = array.astype(np.float32)
        if array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(array))


def load_imagefolder(root: Path, image_size: int = 32) -> DatasetSplits:
    if not root.is_dir():
        raise ConfigError(f"{str(root)!r} is not a directory")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes = _class_names(root / "train")
        train = _folder_dataset(root / "train", classes, image_size)
        test = _folder_dataset(test_dir, classes, image_size)
    else:
        classes = _class_names(root)
        full = _folder_dataset(root, classes, image_size)
        train_idx, test_idx = _stratified_split(torch.tensor(full.labels))
        train, test = Subset(full, train_idx), Subset(full, test_idx)
    mean, std = _channel_stats(torch.stack([train[i][0] for i in range(min(len(train), 512))]))
    return DatasetSplits(train, test, len(classes), 3, image_size, mean, std, natural_images=True)


def _class_names(root: Path) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"{str(root)!r} has no class folders (expected root/<class>/<image>)")
    return classes


def _folder_dataset(root: Path, classes: list[str], size: int) -> ImageFolderDataset:
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label)
    if not files:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}")
    return ImageFolderDataset(files, labels, size)


# --------------------------------------------------------------------------- helpers


def _stratified_split(labels: Tensor, test_fraction: float = 0.2) -> tuple[list[int], list[int]]:
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    counts = torch.bincount(labels)
    stratify = labels.numpy() if counts[counts > 0].min() >= 2 else None
    train_idx, test_idx = train_test_split(
        indices, test_size=test_fraction, random_state=SPLIT_SEED, stratify=stratify
    )
    return sorted(train_idx.tolist()), sorted(test_idx.tolist())


def _split_arrays(images: Tensor, labels: Tensor, natural: bool) -> DatasetSplits:
    train_idx, test_idx = _stratified_split(labels)
    return _splits_from_tensors(
        images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
        int(labels.max()) + 1, natural,
    )


def _splits_from_tensors(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, natural: bool
) -> DatasetSplits:
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
    x = images.float() / 255.0
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
    train = DataLoader(
        splits.train,
        batch_size=batch_size // context.world_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=len(splits.train) > batch_size,  # no 1-sample BatchNorm batches
        # Own generators: creating an iterator draws a seed, which would otherwise
        # come from the global RNG and make results depend on how often we evaluate.
        generator=torch.Generator().manual_seed(seed),
    )
    test = DataLoader(
        splits.test,
        batch_size=max(batch_size, 256),
        sampler=range(context.rank, len(splits.test), context.world_size),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    return train, test
