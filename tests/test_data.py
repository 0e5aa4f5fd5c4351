"""Dataset loaders on small fixtures written in each supported format, and the
loaders' reproducible, shardable ordering."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from srm_ext.distill.config import ConfigError, ExperimentConfig
from srm_ext.distill.data import BatchPreprocessor, load_dataset, make_loaders
from srm_ext.distill.distributed import DistributedContext


def config(**kwargs) -> ExperimentConfig:
    return ExperimentConfig(**kwargs)


def check_splits(splits, n_train, n_test, classes, channels, size):
    assert len(splits.train) == n_train and len(splits.test) == n_test
    assert splits.num_classes == classes and splits.in_channels == channels
    image, label = splits.train[0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (channels, size, size)
    assert 0 <= int(label) < classes
    assert len(splits.mean) == len(splits.std) == channels


def test_digits():
    splits = load_dataset(config(dataset="digits"))
    check_splits(splits, 1437, 360, 10, 1, 8)
    assert not splits.natural_images
    upsampled = load_dataset(config(dataset="digits", image_size=16, train_limit=10, test_limit=5))
    check_splits(upsampled, 10, 5, 10, 1, 16)


def _write_cifar_batch(path: Path, n: int, label_key: bytes, classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch = {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, classes, n).tolist(),
        b"batch_label": b"fixture",
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def test_cifar10_python_folder(tmp_path):
    for i in (1, 2):
        _write_cifar_batch(tmp_path / f"data_batch_{i}", 6, b"labels", 10, i)
    _write_cifar_batch(tmp_path / "test_batch", 4, b"labels", 10, 9)
    splits = load_dataset(config(dataset="cifar10", data_path=str(tmp_path)))
    check_splits(splits, 12, 4, splits.num_classes, 3, 32)
    assert splits.natural_images
    with open(tmp_path / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    expected = torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32))
    assert torch.equal(splits.train[0][0], expected)


def test_cifar100_python_folder(tmp_path):
    _write_cifar_batch(tmp_path / "train", 8, b"fine_labels", 100, 1)
    _write_cifar_batch(tmp_path / "test", 3, b"fine_labels", 100, 2)
    splits = load_dataset(config(dataset="cifar100", data_path=str(tmp_path)))
    assert len(splits.train) == 8 and len(splits.test) == 3


def test_npz_images_and_labels_float_nhwc(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((20, 6, 6, 3)).astype(np.float32)
    labels = np.repeat(np.arange(4), 5)
    np.savez(tmp_path / "data.npz", images=images, labels=labels)
    splits = load_dataset(config(dataset="npz", data_path=str(tmp_path / "data.npz")))
    check_splits(splits, 16, 4, 4, 3, 6)
    # stratified: every class in both splits
    assert len({int(splits.test[i][1]) for i in range(len(splits.test))}) == 4


def test_npz_train_test_arrays_grey(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz",
        x_train=rng.integers(0, 256, (10, 5, 5), dtype=np.uint8),
        y_train=np.arange(10) % 3,
        x_test=rng.integers(0, 256, (4, 5, 5), dtype=np.uint8),
        y_test=np.arange(4) % 3,
    )
    splits = load_dataset(config(dataset="npz", data_path=str(tmp_path / "d.npz")))
    check_splits(splits, 10, 4, 3, 1, 5)


def test_npz_without_known_arrays_is_an_error(tmp_path):
    np.savez(tmp_path / "bad.npz", foo=np.zeros(3))
    with pytest.raises(ConfigError, match="images and labels"):
        load_dataset(config(dataset="npz", data_path=str(tmp_path / "bad.npz")))


def _write_images(root: Path, classes: dict[str, int], size: int = 7) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(pixels).save(root / name / f"{i}{suffix}")


def test_imagefolder_single_tree(tmp_path):
    _write_images(tmp_path, {"cat": 5, "dog": 5})
    splits = load_dataset(config(dataset="imagefolder", data_path=str(tmp_path), image_size=12))
    check_splits(splits, 8, 2, 2, 3, 12)


def test_imagefolder_train_test_tree(tmp_path):
    _write_images(tmp_path / "train", {"a": 3, "b": 2, "c": 2})
    _write_images(tmp_path / "val", {"a": 1, "b": 1, "c": 1})
    splits = load_dataset(config(dataset="imagefolder", data_path=str(tmp_path), image_size=9))
    check_splits(splits, 7, 3, 3, 3, 9)


@pytest.mark.parametrize("dataset", ["cifar10", "npz", "imagefolder"])
def test_missing_data_path_is_a_config_error(tmp_path, dataset):
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset(config(dataset=dataset, data_path=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="--data-path"):
        load_dataset(config(dataset=dataset))


def test_loader_order_is_reproducible_per_epoch_and_shardable():
    splits = load_dataset(config(dataset="digits", train_limit=40, test_limit=8))

    def epoch_labels(loader, epoch):
        loader.sampler.set_epoch(epoch)
        return torch.cat([labels for _, labels in loader])

    single, _ = make_loaders(splits, batch_size=8, seed=3)
    again, _ = make_loaders(splits, batch_size=8, seed=3)
    assert torch.equal(epoch_labels(single, 1), epoch_labels(again, 1))
    # two ranks with batch 4 each see exactly the single process's global batches
    ranks = [
        make_loaders(splits, 8, 3, DistributedContext(rank=r, world_size=2))[0] for r in (0, 1)
    ]
    for r in ranks:
        r.sampler.set_epoch(1)
    single.sampler.set_epoch(1)
    for global_batch, *shards in zip(single, *ranks):
        merged = torch.cat([shard[1] for shard in shards]).sort().values
        assert torch.equal(merged, global_batch[1].sort().values)
    with pytest.raises(ConfigError, match="divisible"):
        make_loaders(splits, 7, 0, DistributedContext(rank=0, world_size=2))


def test_batch_preprocessor_normalises_and_augments():
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    pre = BatchPreprocessor(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), pad=1, flip=True)
    evaluated = pre(images, train=False)
    torch.testing.assert_close(evaluated, (images.float() / 255 - 0.5) / 0.25)
    torch.manual_seed(0)
    augmented = pre(images, train=True)
    assert augmented.shape == evaluated.shape
    torch.manual_seed(0)
    assert torch.equal(augmented, pre(images, train=True))  # draws come from the torch RNG
