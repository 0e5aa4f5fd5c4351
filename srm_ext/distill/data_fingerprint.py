"""A summary of the data a run trains and tests on, kept in its checkpoint.

A resumed run compares it with the data it loads now, so that a dataset
changed in between (files replaced, added or removed) is refused instead of
being mixed into a run that then matches no uninterrupted one. Data moved to
another place is the same data: an image tree's files are named by their path
inside the tree.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from .data import DatasetSplits, ImageFolderDataset

__all__ = ["dataset_fingerprint", "fingerprint_differences"]

# Fingerprints without it named an image tree's files by their full path.
FORMAT = 2


def dataset_fingerprint(splits: DatasetSplits, *, full_paths: bool = False) -> dict[str, Any]:
    """Each split's size and a digest of its labels and images: their bytes
    where they are held in memory, and in an image tree, whose images are read
    as training goes, each file's path in the tree, size and modification time
    (and a second digest without the times). ``full_paths`` gives the earlier
    format, whose digests hold each file's full path instead."""
    # An image tree split 80/20 gives two subsets of one dataset: read it once.
    contents: dict[int, dict[str, str]] = {}
    fingerprint = {
        "train": _split_fingerprint(splits.train, contents, full_paths),
        "test": _split_fingerprint(splits.test, contents, full_paths),
        "classes": splits.num_classes,
        "image_shape": [splits.in_channels, splits.image_size, splits.image_size],
    }
    return fingerprint if full_paths else {"format": FORMAT, **fingerprint}


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
        elif was is not None and "sha256_without_times" in now and (
            was.get("sha256_without_times") == now["sha256_without_times"]
        ):
            differences.append(
                f"the {split} split's files have their names and sizes but other modification "
                "times (rewritten, or copied without them: cp -a and rsync -a keep them)"
            )
        else:
            differences.append(f"the {split} split's images or labels changed")
    for key, what in (("classes", "classes"), ("image_shape", "image shape (C, H, W)")):
        if saved.get(key) != current[key]:
            differences.append(f"{what} {current[key]} (checkpoint: {saved.get(key)})")
    return differences


def _split_fingerprint(
    dataset: Dataset, contents: dict[int, dict[str, str]], full_paths: bool
) -> dict[str, Any]:
    """The split's size and, for each content digest of the dataset beneath its
    subset indices (kept in ``contents``), the sha256 of those indices,
    outermost first, and of that digest."""
    size, indices = len(dataset), []
    while isinstance(dataset, Subset):
        indices.append(repr(list(dataset.indices)).encode())
        dataset = dataset.dataset
    if id(dataset) not in contents:
        contents[id(dataset)] = _content_digests(dataset, full_paths)
    fingerprint: dict[str, Any] = {"size": size}
    for name, content in contents[id(dataset)].items():
        digest = hashlib.sha256()
        for subset in indices:
            digest.update(subset)
        digest.update(content.encode())
        fingerprint[name] = digest.hexdigest()
    return fingerprint


def _content_digests(dataset: Dataset, full_paths: bool) -> dict[str, str]:
    if isinstance(dataset, TensorDataset):
        digest = hashlib.sha256()
        for tensor in dataset.tensors:
            _add_tensor(tensor, digest)
        return {"sha256": digest.hexdigest()}
    if isinstance(dataset, ImageFolderDataset):
        timed, untimed = hashlib.sha256(), hashlib.sha256()
        for path, label in zip(dataset.files, dataset.labels):
            stat = path.stat()
            name = str(path) if full_paths else path.relative_to(dataset.root).as_posix()
            entry = f"{name}\0{label}\0{stat.st_size}"
            timed.update(f"{entry}\0{stat.st_mtime_ns}\n".encode())
            untimed.update(f"{entry}\n".encode())
        if full_paths:
            return {"sha256": timed.hexdigest()}
        return {"sha256": timed.hexdigest(), "sha256_without_times": untimed.hexdigest()}
    raise TypeError(f"no fingerprint for a dataset of type {type(dataset).__name__}")


def _add_tensor(tensor: Tensor, digest: Any) -> None:
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    # The bytes themselves, without a copy where the tensor is contiguous.
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
