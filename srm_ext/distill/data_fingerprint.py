"""A summary of the data a run trains and tests on, kept in its checkpoint.

A resumed run compares it with the data it loads now, so that a dataset
changed in between (files replaced, added or removed) is refused instead of
being mixed into a run that then matches no uninterrupted one.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from .data import DatasetSplits, ImageFolderDataset

__all__ = ["dataset_fingerprint", "fingerprint_differences"]


def dataset_fingerprint(splits: DatasetSplits) -> dict[str, Any]:
    """Each split's size and a digest of its labels and images: their bytes
    where they are held in memory, and in an image tree, whose images are read
    as training goes, each file's path, size and modification time."""
    # An image tree split 80/20 gives two subsets of one dataset: read it once.
    contents: dict[int, str] = {}
    return {
        "train": _split_fingerprint(splits.train, contents),
        "test": _split_fingerprint(splits.test, contents),
        "classes": splits.num_classes,
        "image_shape": [splits.in_channels, splits.image_size, splits.image_size],
    }


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one phrase per difference."""
    differences = []
    for split in ("train", "test"):
        was, now = saved.get(split), current[split]
        if was == now:
            continue
        if was is not None and was.get("size") != now["size"]:
            differences.append(
                f"the {split} split has {now['size']} images (checkpoint: {was.get('size')})"
            )
        else:
            differences.append(f"the {split} split's images or labels changed")
    for key, what in (("classes", "classes"), ("image_shape", "image shape (C, H, W)")):
        if saved.get(key) != current[key]:
            differences.append(f"{what} {current[key]} (checkpoint: {saved.get(key)})")
    return differences


def _split_fingerprint(dataset: Dataset, contents: dict[int, str]) -> dict[str, Any]:
    """The split's size and the sha256 of its subset indices, outermost first,
    and of the content digest of the dataset beneath them (kept in ``contents``)."""
    size, digest = len(dataset), hashlib.sha256()
    while isinstance(dataset, Subset):
        digest.update(repr(list(dataset.indices)).encode())
        dataset = dataset.dataset
    if id(dataset) not in contents:
        contents[id(dataset)] = _content_digest(dataset)
    digest.update(contents[id(dataset)].encode())
    return {"size": size, "sha256": digest.hexdigest()}


def _content_digest(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    if isinstance(dataset, TensorDataset):
        for tensor in dataset.tensors:
            _add_tensor(tensor, digest)
    elif isinstance(dataset, ImageFolderDataset):
        for path, label in zip(dataset.files, dataset.labels):
            stat = path.stat()
            digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        raise TypeError(f"no fingerprint for a dataset of type {type(dataset).__name__}")
    return digest.hexdigest()


def _add_tensor(tensor: Tensor, digest: Any) -> None:
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    # The bytes themselves, without a copy where the tensor is contiguous.
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
