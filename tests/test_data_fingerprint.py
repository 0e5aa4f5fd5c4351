"""The dataset fingerprint a resumed run compares with its checkpoint's: equal
for the same data loaded again, different for any change a run would see."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from srm_ext.distill.config import ExperimentConfig
from srm_ext.distill.data import load_dataset
from srm_ext.distill.data_fingerprint import dataset_fingerprint, fingerprint_differences


def _fingerprint(**settings):
    return dataset_fingerprint(load_dataset(ExperimentConfig(**settings)))


def _write_tree(root, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_the_same_data_loaded_again_has_the_same_fingerprint():
    first = _fingerprint(train_limit=100)
    assert first == _fingerprint(train_limit=100)
    assert fingerprint_differences(first, _fingerprint(train_limit=100)) == []
    assert first["train"]["size"] == 100 and first["classes"] == 10
    assert first["image_shape"] == [1, 8, 8]


def test_a_different_sample_or_size_of_the_same_data_differs():
    base = _fingerprint(train_limit=100)
    assert fingerprint_differences(base, _fingerprint(train_limit=101)) == [
        "the train split has 101 images (checkpoint: 100)"
    ]
    assert fingerprint_differences(base, _fingerprint(train_limit=100, image_size=9)) == [
        "the train split's images or labels changed",
        "the test split's images or labels changed",
        "image shape (C, H, W) [1, 9, 9] (checkpoint: [1, 8, 8])",
    ]


def test_a_tensor_split_digest_covers_every_byte(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"images": rng.integers(0, 256, (40, 4, 4), dtype=np.uint8), "labels": np.arange(40) % 2}
    path = tmp_path / "data.npz"
    settings = dict(dataset="npz", data_path=str(path))
    np.savez(path, **arrays)
    base = _fingerprint(**settings)
    for i in range(40):  # one changed pixel anywhere is seen
        changed = {**arrays, "images": arrays["images"].copy()}
        changed["images"][i, 3, 3] ^= 1
        np.savez(path, **changed)
        assert _fingerprint(**settings) != base, i


def test_an_image_tree_fingerprint_sees_replaced_added_and_removed_files(tmp_path):
    _write_tree(tmp_path)
    settings = dict(dataset="imagefolder", data_path=str(tmp_path), image_size=6)
    base = _fingerprint(**settings)
    assert base == _fingerprint(**settings)

    (tmp_path / "cat" / "0.png").write_bytes((tmp_path / "dog" / "4.png").read_bytes())
    assert fingerprint_differences(base, _fingerprint(**settings)) != []

    _write_tree(tmp_path)  # the same images written again: a newer modification time
    later = _fingerprint(**settings)
    stat = (tmp_path / "dog" / "1.png").stat()
    os.utime(tmp_path / "dog" / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert fingerprint_differences(later, _fingerprint(**settings)) != []

    later = _fingerprint(**settings)
    for change, images in [(lambda: (tmp_path / "dog" / "9.png").write_bytes(b"png"), 11),
                           (lambda: (tmp_path / "dog" / "9.png").unlink(), 10),
                           (lambda: (tmp_path / "cat" / "2.png").unlink(), 9)]:
        change()
        now = _fingerprint(**settings)
        assert now["train"]["size"] + now["test"]["size"] == images
        assert (fingerprint_differences(later, now) != []) == (images != 10)


def test_an_image_tree_moved_elsewhere_keeps_its_fingerprint(tmp_path):
    _write_tree(tmp_path / "here")
    settings = dict(dataset="imagefolder", image_size=6)
    base = _fingerprint(**settings, data_path=str(tmp_path / "here"))
    base_full = dataset_fingerprint(
        load_dataset(ExperimentConfig(**settings, data_path=str(tmp_path / "here"))), full_paths=True
    )
    (tmp_path / "here").rename(tmp_path / "there")
    moved = load_dataset(ExperimentConfig(**settings, data_path=str(tmp_path / "there")))
    assert dataset_fingerprint(moved) == base and base["format"] == 2
    # The earlier format named each file by its full path: a moved tree differed.
    assert "format" not in base_full and base_full["train"].keys() == {"size", "sha256"}
    assert fingerprint_differences(base_full, dataset_fingerprint(moved, full_paths=True)) == [
        "the train split's images or labels changed", "the test split's images or labels changed"
    ]
    # A copy that did not keep the modification times is told apart from changed images.
    shutil.copytree(tmp_path / "there", tmp_path / "copy", copy_function=shutil.copyfile)
    for path in (tmp_path / "copy").rglob("*.png"):  # later, however coarse the clock
        os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
    copied = _fingerprint(**settings, data_path=str(tmp_path / "copy"))
    assert fingerprint_differences(base, copied) == [
        f"the {split} split's files have their names and sizes but other modification times "
        "(rewritten, or copied without them: cp -a and rsync -a keep them)" for split in ("train", "test")
    ]


def test_an_image_tree_split_in_two_is_read_once(tmp_path, monkeypatch):
    _write_tree(tmp_path)
    splits = load_dataset(ExperimentConfig(dataset="imagefolder", data_path=str(tmp_path), image_size=6))
    stats = []
    stat = Path.stat
    monkeypatch.setattr(Path, "stat", lambda self, **kw: stats.append(self) or stat(self, **kw))
    fingerprint = dataset_fingerprint(splits)
    assert len(stats) == 10 and fingerprint["train"] != fingerprint["test"]


def test_a_dataset_of_another_kind_has_no_fingerprint():
    splits = load_dataset(ExperimentConfig(train_limit=50))
    splits.train = [(torch.zeros(1, 8, 8, dtype=torch.uint8), 0)]
    with pytest.raises(TypeError, match="no fingerprint for a dataset of type list"):
        dataset_fingerprint(splits)
