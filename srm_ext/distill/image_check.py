"""Every image of a run's image tree read once before training (``--check-images``).

An image tree is read as training goes, so an unreadable file would otherwise
stop the run at the epoch that first draws it, and replacing the file then
changes the data that the run's checkpoint holds it to. Up front, all such
files are found at once and listed.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from .config import ConfigError
from .data import DatasetSplits, ImageFolderDataset
from .distributed import DistributedContext
from .interrupt_safe_loader import InterruptSafeDataLoader

__all__ = ["check_images"]

# Unreadable files named in the error; the rest are counted.
_LISTED = 10


def check_images(
    splits: DatasetSplits,
    num_workers: int = 0,
    progress: bool = False,
    context: DistributedContext | None = None,
    device: torch.device | str = "cpu",
) -> None:
    """Reads every image of the splits that an image tree holds, as training
    would (decoded, converted and resized), in ``num_workers`` loader
    processes; a ConfigError lists the files that cannot be read. Splits held
    in memory were read when they loaded: there is nothing to do. Under
    torch.distributed the main process reads them and every process raises
    (``device``: where the count is summed, a CUDA device for NCCL)."""
    context = context or DistributedContext()
    unreadable = []
    for name, split in (("training", splits.train), ("held-out", splits.test)):
        if not context.is_main or not _in_image_tree(split):
            continue
        loader = InterruptSafeDataLoader(
            _Readability(split), batch_size=None, num_workers=num_workers
        )
        bar = tqdm(loader, desc=f"reading the {name} images", leave=False, disable=not progress)
        unreadable += [message for message in bar if message]
    (count,) = context.sum([len(unreadable)], device)
    if not count:
        return
    if not unreadable:
        raise ConfigError(f"{int(count)} image(s) cannot be read (the main process lists them)")
    more = len(unreadable) - _LISTED
    listed = "; ".join(unreadable[:_LISTED]) + (f"; and {more} more" if more > 0 else "")
    raise ConfigError(f"{len(unreadable)} image(s) cannot be read: {listed}")


def _in_image_tree(split: Dataset) -> bool:
    while isinstance(split, Subset):
        split = split.dataset
    return isinstance(split, ImageFolderDataset)


class _Readability(Dataset):
    """The error reading each image of ``split`` gives, or "" where it reads."""

    def __init__(self, split: Dataset) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> str:
        try:
            self.split[index]
        except ConfigError as exc:  # ImageFolderDataset's, naming the file
            return str(exc)
        return ""
