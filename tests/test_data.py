"""Dataset loaders on small fixtures written in each supported format, and the
loaders' reproducible, shardable ordering."""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils.data._utils.worker as worker_module
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from srm_ext.distill.config import ConfigError, ExperimentConfig
from srm_ext.distill.data import BatchPreprocessor, load_dataset, make_loaders
from srm_ext.distill.distributed import DistributedContext
from srm_ext.distill.interrupt_safe_loader import InterruptSafeDataLoader


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
    assert splits.class_names == tuple("0123456789")
    upsampled = load_dataset(config(dataset="digits", image_size=16, train_limit=10, test_limit=5))
    check_splits(upsampled, 10, 5, 10, 1, 16)


def test_given_input_statistics_replace_the_training_splits():
    measured = load_dataset(config(dataset="digits"))
    given = load_dataset(config(dataset="digits", input_mean=[0.5], input_std=[0.25]))
    assert (given.mean, given.std) == ((0.5,), (0.25,)) != (measured.mean, measured.std)
    only_std = load_dataset(config(dataset="digits", input_std=(2,)))
    assert (only_std.mean, only_std.std) == (measured.mean, (2.0,))
    assert config(input_std=(2,)).to_dict()["input_std"] == [2.0]  # as config.json gives it back


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(input_mean=[0.5, 0.5, 0.5]), "--input-mean gives 3 value(s) but the images have 1 channel(s)"),
        (dict(input_std=[0.2, 0.2]), "--input-std gives 2 value(s) but the images have 1 channel(s)"),
    ],
)
def test_input_statistics_must_give_one_value_per_channel(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_dataset(config(dataset="digits", **settings))


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
    check_splits(splits, 12, 4, 10, 3, 32)
    assert splits.natural_images
    with open(tmp_path / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    expected = torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32))
    assert torch.equal(splits.train[0][0], expected)


def test_cifar_batches_pickled_again_with_str_keys_are_read(tmp_path):
    for name, n in (("data_batch_1", 6), ("test_batch", 4)):
        _write_cifar_batch(tmp_path / name, n, b"labels", 10, n)
        with open(tmp_path / name, "rb") as f:
            raw = pickle.load(f, encoding="bytes")
        with open(tmp_path / name, "wb") as f:
            pickle.dump({key.decode(): value for key, value in raw.items()}, f)
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    splits = load_dataset(config(dataset="cifar10", data_path=str(tmp_path)))
    check_splits(splits, 6, 4, 10, 3, 32)
    assert splits.class_names[:2] == ("c0", "c1")


def test_cifar100_python_folder(tmp_path):
    _write_cifar_batch(tmp_path / "train", 8, b"fine_labels", 100, 1)
    _write_cifar_batch(tmp_path / "test", 3, b"fine_labels", 100, 2)
    splits = load_dataset(config(dataset="cifar100", data_path=str(tmp_path)))
    check_splits(splits, 8, 3, 100, 3, 32)


@pytest.mark.parametrize("classes, meta_file, key", [(10, "batches.meta", b"label_names"),
                                                     (100, "meta", b"fine_label_names")])
def test_cifar_class_names_come_from_its_meta_file(tmp_path, classes, meta_file, key):
    label_key = b"labels" if classes == 10 else b"fine_labels"
    _write_cifar_batch(tmp_path / "train", 8, label_key, classes, 1)
    _write_cifar_batch(tmp_path / "test", 3, label_key, classes, 2)
    settings = config(dataset=f"cifar{classes}", data_path=str(tmp_path))
    assert load_dataset(settings).class_names is None  # no meta file
    names = [f"class {i}".encode() for i in range(classes)]
    for meta, expected in [
        ({key: names, b"coarse_label_names": [b"x"]}, tuple(f"class {i}" for i in range(classes))),
        ({key: names[:-1]}, None),  # not one name per class: names nothing
        ({b"num_vis": 3072}, None),
    ]:
        with open(tmp_path / meta_file, "wb") as f:
            pickle.dump(meta, f)
        assert load_dataset(settings).class_names == expected
    (tmp_path / meta_file).write_bytes(b"not a pickle")  # names only label results: not refused
    assert load_dataset(settings).class_names is None


def test_cifar100_folder_named_as_cifar10_is_a_config_error(tmp_path):
    _write_cifar_batch(tmp_path / "train", 8, b"fine_labels", 100, 1)
    _write_cifar_batch(tmp_path / "test", 3, b"fine_labels", 100, 2)
    with pytest.raises(ConfigError, match="use --dataset cifar100"):
        load_dataset(config(dataset="cifar10", data_path=str(tmp_path)))


def test_cifar10_folder_named_as_cifar100_is_a_config_error(tmp_path):
    # Its labels 0..9 fit 100 classes too: only the batches' key tells.
    _write_cifar_batch(tmp_path / "data_batch_1", 8, b"labels", 10, 1)
    _write_cifar_batch(tmp_path / "test_batch", 3, b"labels", 10, 2)
    expected = f"{tmp_path / 'data_batch_1'} holds b'labels', not b'fine_labels': a CIFAR-10 batch? use --dataset cifar10"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_dataset(config(dataset="cifar100", data_path=str(tmp_path)))


def test_cifar_training_batches_must_run_from_one_without_a_gap(tmp_path):
    for i in (1, 2, 4):
        _write_cifar_batch(tmp_path / f"data_batch_{i}", 6, b"labels", 10, i)
    _write_cifar_batch(tmp_path / "test_batch", 4, b"labels", 10, 9)
    with pytest.raises(ConfigError, match="has data_batch_4 but lacks data_batch_3;"):
        load_dataset(config(dataset="cifar10", data_path=str(tmp_path)))
    # A copy beside the batches is no batch; batch 10 comes after batch 9.
    (tmp_path / "data_batch_4").rename(tmp_path / "data_batch_1.bak")
    (tmp_path / "data_batch_02").write_bytes((tmp_path / "data_batch_2").read_bytes())
    for i in range(3, 11):
        _write_cifar_batch(tmp_path / f"data_batch_{i}", 1, b"labels", 10, i)
    splits = load_dataset(config(dataset="cifar10", data_path=str(tmp_path)))
    assert len(splits.train) == 12 + 8
    with open(tmp_path / "data_batch_10", "rb") as f:
        last = pickle.load(f, encoding="bytes")[b"data"][0].reshape(3, 32, 32)
    assert torch.equal(splits.train[len(splits.train) - 1][0], torch.from_numpy(last))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("more labels", r"b'labels' has shape \(23,\) \(int64\) for 20 images; expected one "
         "integer label per image"),
        ("narrow rows", r"b'data' has shape \(20, 3000\); expected \(N, 3072\)"),
        ("no images", r"b'data' has shape \(0, 3072\); expected \(N, 3072\) with N >= 1"),
        ("floats in [0, 1]", "b'data' must hold 8-bit pixel values 0..255; got float32"),
    ],
    ids=["more labels", "narrow rows", "no images", "floats in [0, 1]"],
)
def test_malformed_cifar_batch_is_an_error_naming_the_file(tmp_path, case, expected):
    _write_cifar_batch(tmp_path / "data_batch_1", 20, b"labels", 10, 1)
    _write_cifar_batch(tmp_path / "test_batch", 4, b"labels", 10, 2)
    with open(tmp_path / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    if case == "more labels":
        batch[b"labels"] += [0, 1, 2]
    elif case == "narrow rows":
        batch[b"data"] = batch[b"data"][:, :3000]
    elif case == "no images":
        batch[b"data"], batch[b"labels"] = batch[b"data"][:0], []
    else:
        batch[b"data"] = batch[b"data"].astype(np.float32) / 255
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump(batch, f)
    prefix = re.escape(str(tmp_path / "data_batch_1")) + ": "
    with pytest.raises(ConfigError, match=prefix + expected):
        load_dataset(config(dataset="cifar10", data_path=str(tmp_path)))


def test_cifar_training_batches_of_one_class_are_refused(tmp_path):
    batch = {b"data": np.zeros((6, 3072), dtype=np.uint8), b"labels": [4] * 6}
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump(batch, f)
    _write_cifar_batch(tmp_path / "test_batch", 4, b"labels", 10, 2)
    with pytest.raises(ConfigError, match="every training image has the same class \\(4\\)"):
        load_dataset(config(dataset="cifar10", data_path=str(tmp_path)))


def test_npz_images_and_labels_float_nhwc(tmp_path):
    rng = np.random.default_rng(0)
    # One image, distinct at every position and channel, so any other
    # reordering of the (H, W, C) values than a transpose shows.
    base = rng.random((6, 6, 3)).astype(np.float32)
    images = np.broadcast_to(base, (20, 6, 6, 3))
    labels = np.repeat(np.arange(4), 5)
    np.savez(tmp_path / "data.npz", images=images, labels=labels)
    splits = load_dataset(config(dataset="npz", data_path=str(tmp_path / "data.npz")))
    check_splits(splits, 16, 4, 4, 3, 6)
    # stratified: every class in both splits
    assert len({int(splits.test[i][1]) for i in range(len(splits.test))}) == 4
    # floats in [0, 1] are rounded to the nearest of 256 levels
    expected = torch.from_numpy(np.rint(base * 255).astype(np.uint8)).permute(2, 0, 1)
    for split in (splits.train, splits.test):
        assert all(torch.equal(split[i][0], expected) for i in range(len(split)))


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


@pytest.mark.parametrize("held_out", [False, True])
def test_npz_class_names_label_the_classes(tmp_path, held_out):
    rng = np.random.default_rng(0)
    arrays = dict(images=rng.integers(0, 256, (12, 5, 5), dtype=np.uint8), labels=np.arange(12) % 3)
    if held_out:
        arrays.update(test_images=arrays["images"][:3], test_labels=np.arange(3))
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    assert load_dataset(config(dataset="npz", data_path=str(path))).class_names is None
    for names in (["cat", "dog", "bird"], np.array([b"cat", b"dog", b"bird"])):
        np.savez(path, **arrays, class_names=names)
        splits = load_dataset(config(dataset="npz", data_path=str(path)))
        assert splits.class_names == ("cat", "dog", "bird")
    for names, message in [
        (["cat", "dog"], "class_names has 2 names for the labels' 3 classes; expected one name per class"),
        ([1, 2, 3], r"class_names in .* has shape \(3,\) \(int64\); expected one string per class"),
        (np.array(["a", None, "c"], dtype=object), "class_names in .* is an array of objects"),
    ]:
        np.savez(path, **arrays, class_names=names)
        with pytest.raises(ConfigError, match=message):
            load_dataset(config(dataset="npz", data_path=str(path)))


@pytest.mark.parametrize("size", [16, 64])
def test_cifar_images_are_resized_to_a_given_image_size(tmp_path, size):
    _write_cifar_batch(tmp_path / "data_batch_1", 6, b"labels", 10, 1)
    _write_cifar_batch(tmp_path / "test_batch", 4, b"labels", 10, 2)
    stored = load_dataset(config(dataset="cifar10", data_path=str(tmp_path)))
    splits = load_dataset(config(dataset="cifar10", data_path=str(tmp_path), image_size=size))
    check_splits(splits, 6, 4, 10, 3, size)
    assert splits.image_size == size
    for resized, original in ((splits.train, stored.train), (splits.test, stored.test)):
        images = torch.stack([original[i][0] for i in range(len(original))]).float()
        expected = F.interpolate(
            images, size=(size, size), mode="bilinear", antialias=size < 32
        ).round().clamp(0, 255).to(torch.uint8)
        assert torch.equal(torch.stack([resized[i][0] for i in range(len(resized))]), expected)
        assert [int(resized[i][1]) for i in range(len(resized))] == [
            int(original[i][1]) for i in range(len(original))
        ]
    # The input statistics are the resized training images'.
    train = torch.stack([splits.train[i][0] for i in range(6)]).float() / 255
    assert splits.mean == pytest.approx(train.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert splits.std == pytest.approx(train.std(dim=(0, 2, 3)).tolist(), abs=1e-6)


def test_npz_images_are_resized_to_a_given_image_size(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz",
        images=rng.integers(0, 256, (12, 5, 5), dtype=np.uint8),
        labels=np.arange(12) % 2,
    )
    splits = load_dataset(config(dataset="npz", data_path=str(tmp_path / "d.npz"), image_size=7))
    check_splits(splits, 9, 3, 2, 1, 7)
    same = load_dataset(config(dataset="npz", data_path=str(tmp_path / "d.npz"), image_size=5))
    check_splits(same, 9, 3, 2, 1, 5)


def test_a_data_path_with_the_built_in_digits_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="the digits dataset is built in and reads no --data-path"):
        load_dataset(config(dataset="digits", data_path=str(tmp_path)))


@pytest.mark.parametrize(
    "test_shape",
    [(20, 12, 12), (20, 16, 16, 3)],
    ids=["grey test, colour train", "larger test images"],
)
def test_npz_train_and_test_images_must_agree(tmp_path, test_shape):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (60, 12, 12, 3), dtype=np.uint8),
        y_train=np.arange(60) % 3,
        x_test=rng.integers(0, 256, test_shape, dtype=np.uint8),
        y_test=np.arange(20) % 3,
    )
    expected = (
        f"{str(path)!r}: x_train has shape (60, 12, 12, 3) but x_test has shape {test_shape}; "
        "expected images of the same size and channels in both"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_dataset(config(dataset="npz", data_path=str(path)))


def test_npz_images_that_are_not_square_are_refused(tmp_path):
    # The run's image size is one side, which augmentation and the saved models assume.
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((10, 16, 6), dtype=np.uint8), labels=np.arange(10) % 2)
    with pytest.raises(ConfigError, match=re.escape("the images are 16x6; expected square images")):
        load_dataset(config(dataset="npz", data_path=str(path)))


def test_npz_images_of_any_shape_are_resized_to_a_given_image_size(tmp_path):
    # --image-size resizes any dataset: non-square images, and test images of
    # another size than the training ones, become S x S before any check.
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (30, 16, 6), dtype=np.uint8),
        y_train=np.arange(30) % 3,
        x_test=np.full((6, 9, 9), 200, dtype=np.uint8),
        y_test=np.arange(6) % 3,
    )
    splits = load_dataset(config(dataset="npz", data_path=str(path), image_size=8))
    check_splits(splits, 30, 6, 3, 1, 8)
    assert (splits.test.tensors[0] == 200).all()  # a uniform image stays uniform


@pytest.mark.parametrize("key", ["images", "x_train", "x_test"])
def test_npz_empty_image_array_is_an_error_naming_it(tmp_path, key):
    path = tmp_path / "d.npz"
    images, labels = np.zeros((10, 4, 4), dtype=np.uint8), np.arange(10) % 2
    arrays = dict(images=images, labels=labels)
    if key != "images":
        arrays = dict(x_train=images, y_train=labels, x_test=images, y_test=labels)
    label_key = {"images": "labels", "x_train": "y_train", "x_test": "y_test"}[key]
    arrays[key], arrays[label_key] = images[:0], labels[:0]
    np.savez(path, **arrays)
    with pytest.raises(ConfigError, match=re.escape(f"{key} in {str(path)!r} is empty")):
        load_dataset(config(dataset="npz", data_path=str(path)))


@pytest.mark.parametrize(
    "labels, expected",
    [
        (np.zeros(20), r"every training image has the same class \(0\); expected at least 2"),
        (np.full(1, 3), r"every training image has the same class \(3\)"),
        (np.arange(20) % 3 * 50000, "labels are class indices, so labels up to 100000 make "
         r"100001 classes, but only 3 distinct labels occur; expected at most as many unused "
         r"class indices as used ones \(renumber the labels 0..2\)"),
        (np.arange(20) % 3 * 3 + 3, "labels are class indices, so labels up to 9 make 10 classes"),
    ],
    ids=["one class", "one image", "sparse", "more unused than used"],
)
def test_npz_labels_must_name_at_least_two_mostly_used_classes(tmp_path, labels, expected):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((len(labels), 4, 4), dtype=np.uint8), labels=labels)
    with pytest.raises(ConfigError, match=re.escape(repr(str(path))) + ": " + expected):
        load_dataset(config(dataset="npz", data_path=str(path)))


@pytest.mark.parametrize(
    "present, num_classes", [(range(1, 11), 11), ([0, 2, 3], 4)], ids=["1-based", "one unused"]
)
def test_npz_labels_with_a_few_unused_indices_keep_them(tmp_path, present, num_classes):
    # 20 images of up to 10 classes: too few to stratify, but still split
    labels = np.resize(list(present), 20)
    np.savez(tmp_path / "d.npz", images=np.zeros((20, 4, 4), dtype=np.uint8), labels=labels)
    splits = load_dataset(config(dataset="npz", data_path=str(tmp_path / "d.npz")))
    assert splits.num_classes == num_classes
    assert len(splits.train) == 16 and len(splits.test) == 4


def test_npz_without_known_arrays_is_an_error(tmp_path):
    np.savez(tmp_path / "bad.npz", foo=np.zeros(3))
    with pytest.raises(ConfigError, match="images and labels"):
        load_dataset(config(dataset="npz", data_path=str(tmp_path / "bad.npz")))


@pytest.mark.parametrize("present", ["test_images", "test_labels"])
def test_npz_held_out_images_without_their_labels_are_refused(tmp_path, present):
    # Else the held-out set would silently become 20% of the training images.
    images, labels = np.zeros((10, 4, 4), np.uint8), np.arange(10) % 2
    held_out = {"test_images": images[:4]} if present == "test_images" else {"test_labels": labels[:4]}
    np.savez(tmp_path / "d.npz", images=images, labels=labels, **held_out)
    with pytest.raises(ConfigError, match=f"holds {present} but not test_"):
        load_dataset(config(dataset="npz", data_path=str(tmp_path / "d.npz")))


def test_npz_big_endian_uint16_images_are_scaled_as_little_endian_ones(tmp_path):
    ramp = np.arange(0, 65536, 257, dtype=np.uint16)[:250].reshape(10, 5, 5)
    loaded = []
    for order in ("<u2", ">u2"):
        np.savez(tmp_path / "d.npz", images=ramp.astype(order), labels=np.arange(10) % 2)
        splits = load_dataset(config(dataset="npz", data_path=str(tmp_path / "d.npz")))
        loaded.append(splits.train.tensors[0])
    assert torch.equal(loaded[0], loaded[1]) and int(loaded[1].max()) > 200


def test_npz_labels_beyond_any_class_count_are_refused(tmp_path):
    labels = np.array([0, 1, 2**63 + 5, 1], dtype=np.uint64)
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 4, 4), np.uint8), labels=labels)
    with pytest.raises(ConfigError, match="labels must be class indices below 2147483648; found 9.2"):
        load_dataset(config(dataset="npz", data_path=str(tmp_path / "d.npz")))


def test_npz_uint16_images_are_scaled_by_their_full_range(tmp_path):
    # a 16-bit ramp and 12-bit values stored as uint16: scaled by 65535, never clipped
    ramp = np.arange(0, 65536, 257, dtype=np.uint16)[:250].reshape(10, 5, 5)
    twelve_bit = np.linspace(0, 4095, 4 * 25).astype(np.uint16).reshape(4, 5, 5)
    np.savez(
        tmp_path / "u16.npz",
        x_train=ramp, y_train=np.arange(10) % 2, x_test=twelve_bit, y_test=np.arange(4) % 2
    )
    splits = load_dataset(config(dataset="npz", data_path=str(tmp_path / "u16.npz")))
    check_splits(splits, 10, 4, 2, 1, 5)
    train = torch.stack([splits.train[i][0] for i in range(10)])
    test = torch.stack([splits.test[i][0] for i in range(4)])
    assert torch.equal(train[:, 0], torch.from_numpy(ramp // 257).to(torch.uint8))
    expected = np.rint(twelve_bit / 65535 * 255).astype(np.uint8)
    assert torch.equal(test[:, 0], torch.from_numpy(expected))
    # uint8 storage costs 12-bit data precision (17 levels), but nothing saturates
    assert int(test.max()) == 16 and int(splits.train[9][0].max()) == 249


@pytest.mark.parametrize(
    "images, got",
    [
        (np.linspace(-2.1, 3.0, 6 * 16, dtype=np.float32), "float32 in [-2.1, 3]"),
        (np.linspace(0, 1.5, 6 * 16), "float64 in [0, 1.5]"),
        (np.arange(6 * 16, dtype=np.int32) - 5, "int32 in [-5, 90]"),
        (np.arange(6 * 16) % 2 == 0, "bool"),
    ],
    ids=["standardised", "above 1", "negative int32", "bool"],
)
def test_npz_images_must_be_uint8_uint16_or_floats_in_unit_range(tmp_path, images, got):
    path = tmp_path / "bad.npz"
    np.savez(path, images=images.reshape(6, 4, 4), labels=np.arange(6) % 2)
    with pytest.raises(ConfigError) as error:
        load_dataset(config(dataset="npz", data_path=str(path)))
    message = str(error.value)
    assert str(path) in message
    assert "images must be uint8, uint16, integers in [0, 255] or float in [0, 1]" in message
    assert message.endswith(f"got {got}")


def test_npz_8bit_values_in_a_wider_integer_type_load_as_they_are(tmp_path):
    # np.array of Python ints is int64: 8-bit values in it need no scaling.
    images = np.arange(6 * 16).reshape(6, 4, 4) * 2
    np.savez(tmp_path / "int64.npz", images=images, labels=np.arange(6) % 2)
    splits = load_dataset(config(dataset="npz", data_path=str(tmp_path / "int64.npz")))
    loaded = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    assert loaded.dtype == torch.uint8 and int(loaded.max()) <= 190
    assert set(loaded.flatten().tolist()) <= set(images.flatten().tolist())


@pytest.mark.parametrize("content", ["truncated", "one array", "text", "directory"])
def test_unreadable_npz_is_a_config_error_naming_the_file(tmp_path, content):
    path = tmp_path / "data.npz"
    if content == "truncated":
        path.write_bytes(b"PK\x03\x04 cut short")
    elif content == "one array":
        with open(path, "wb") as f:
            np.save(f, np.zeros((2, 4, 4), dtype=np.uint8))
    elif content == "text":
        path.write_text("images,labels\n")
    else:
        path.mkdir()
    with pytest.raises(ConfigError, match=re.escape(repr(str(path)))) as info:
        load_dataset(config(dataset="npz", data_path=str(path)))
    if content in ("one array", "text"):
        assert "is not an .npz archive" in str(info.value)


def _label_fixture(case: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 8, 8), dtype=np.uint8)
    labels = np.arange(60) % 3
    split = dict(x_train=images[:40], y_train=labels[:40], x_test=images[40:], y_test=labels[40:])
    return {
        "too few": dict(images=images, labels=labels[:50]),
        "one-hot": dict(images=images, labels=np.eye(3)[labels]),
        "negative": dict(images=images, labels=labels - 1),
        "fractional": dict(images=images, labels=labels / 2),
        "too few test": {**split, "y_test": labels[41:]},
        "one-hot train": {**split, "y_train": np.eye(3)[labels[:40]]},
        "negative test": {**split, "y_test": -labels[40:]},
        "column of floats": dict(images=images, labels=labels[:, None].astype(np.float32)),
    }[case]


LABEL_ERRORS = {
    "too few": "labels has 50 labels but images has 60 images; expected one label per image",
    "one-hot": r"labels in .* shape \(60, 3\); labels must be 1-D integer class indices, "
    "not one-hot",
    "negative": "labels in .*: labels must be >= 0; found -1",
    "fractional": "labels in .* are float64; labels must be integer class indices",
    "too few test": "y_test has 19 labels but x_test has 20 images",
    "one-hot train": "y_train in .* not one-hot",
    "negative test": "y_test in .*: labels must be >= 0; found -2",
}


@pytest.mark.parametrize("case", LABEL_ERRORS)
def test_npz_labels_must_be_one_non_negative_class_index_per_image(tmp_path, case):
    path = tmp_path / "labels.npz"
    np.savez(path, **_label_fixture(case))
    with pytest.raises(ConfigError, match=LABEL_ERRORS[case]) as error:
        load_dataset(config(dataset="npz", data_path=str(path)))
    assert str(path) in str(error.value)


def test_npz_column_of_whole_float_labels_is_class_indices(tmp_path):
    np.savez(tmp_path / "labels.npz", **_label_fixture("column of floats"))
    splits = load_dataset(config(dataset="npz", data_path=str(tmp_path / "labels.npz")))
    check_splits(splits, 48, 12, 3, 1, 8)


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
    assert splits.class_names == ("cat", "dog")


def test_imagefolder_statistics_sample_every_class(tmp_path, monkeypatch):
    # The tree lists its images class by class: the statistics must not come
    # from the first class alone when the sample is smaller than the split.
    from PIL import Image

    from srm_ext.distill import data

    monkeypatch.setattr(data, "_STATS_SAMPLE", 8)
    for name, level in (("dark", 0), ("bright", 255)):
        for split, count in (("train", 20), ("test", 1)):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (3, 3), (level,) * 3).save(tmp_path / split / name / f"{i}.png")
    splits = load_dataset(config(dataset="imagefolder", data_path=str(tmp_path), image_size=3))
    assert splits.mean == pytest.approx((0.5,) * 3)
    assert splits.std == pytest.approx((0.5,) * 3, rel=0.1)


def test_sample_limits_spread_over_splits_listed_class_by_class(tmp_path):
    # A prefix of an image tree's split would hold its first class only.
    _write_images(tmp_path / "train", {"a": 6, "b": 6, "c": 6})
    _write_images(tmp_path / "test", {"a": 3, "b": 3, "c": 3})
    settings = dict(dataset="imagefolder", data_path=str(tmp_path), image_size=4)
    splits = load_dataset(config(**settings, train_limit=3, test_limit=3))
    for split in (splits.train, splits.test):
        assert sorted(int(split[i][1]) for i in range(len(split))) == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"--train-limit 1: every training image has the same class \(0\)"):
        load_dataset(config(**settings, train_limit=1))


def test_imagefolder_skips_hidden_files_and_folders(tmp_path):
    # macOS ._* resource forks and .ipynb_checkpoints are not images or classes.
    _write_images(tmp_path, {"cat": 5, "dog": 5})
    (tmp_path / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 not an image")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "dog" / ".thumbnails").mkdir()
    (tmp_path / "dog" / ".thumbnails" / "0.png").write_bytes(b"not an image either")
    splits = load_dataset(config(dataset="imagefolder", data_path=str(tmp_path), image_size=12))
    check_splits(splits, 8, 2, 2, 3, 12)


def test_imagefolder_train_test_tree(tmp_path):
    _write_images(tmp_path / "train", {"a": 3, "b": 2, "c": 2})
    _write_images(tmp_path / "val", {"a": 1, "b": 1, "c": 1})
    splits = load_dataset(config(dataset="imagefolder", data_path=str(tmp_path), image_size=9))
    check_splits(splits, 7, 3, 3, 3, 9)
    assert splits.class_names == ("a", "b", "c")


@pytest.mark.parametrize("held_out", ["test", "val", "valid", "validation", "Valid"])
def test_imagefolder_held_out_split_names(tmp_path, held_out):
    _write_images(tmp_path / "train", {"a": 3, "b": 3})
    _write_images(tmp_path / held_out, {"a": 1, "b": 2})
    splits = load_dataset(config(dataset="imagefolder", data_path=str(tmp_path), image_size=9))
    check_splits(splits, 6, 3, 2, 3, 9)
    assert [splits.test[i][1] for i in range(3)] == [0, 1, 1]


def test_imagefolder_prefers_test_over_other_held_out_splits(tmp_path):
    _write_images(tmp_path / "train", {"a": 2, "b": 2})
    _write_images(tmp_path / "valid", {"a": 1, "b": 1})
    _write_images(tmp_path / "test", {"a": 2, "b": 1})
    splits = load_dataset(config(dataset="imagefolder", data_path=str(tmp_path), image_size=9))
    assert len(splits.test) == 3


@pytest.mark.parametrize(
    "folders, found",
    [
        (["train"], "train/"),
        (["train", "extra"], "extra/, train/"),
        (["train", "test", "holdout"], "holdout/, test/, train/"),
        (["training", "testing"], "testing/, training/"),
        (["valid", "other"], "other/, valid/"),
    ],
)
def test_imagefolder_split_folders_must_be_train_and_held_out(tmp_path, folders, found):
    for name in folders:
        _write_images(tmp_path / name, {"a": 2, "b": 2})
    with pytest.raises(ConfigError) as error:
        load_dataset(config(dataset="imagefolder", data_path=str(tmp_path)))
    assert str(error.value) == (
        f"{str(tmp_path)!r} holds folders {found}; expected class folders root/<class>/<image>, "
        "or split folders train/<class>/<image> and test/, val/, valid/ or validation/ "
        "(the first present is held out) and no others"
    )


def test_imagefolder_held_out_classes_must_be_training_classes(tmp_path):
    _write_images(tmp_path / "train", {"a": 2, "b": 2})
    _write_images(tmp_path / "test", {"a": 1, "c": 1, "d": 1})
    expected = (
        f"{str(tmp_path / 'test')!r} has classes c, d that {str(tmp_path / 'train')!r} lacks"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_dataset(config(dataset="imagefolder", data_path=str(tmp_path)))


@pytest.mark.parametrize("layout", ["classes", "splits"])
def test_imagefolder_training_class_folders_without_images_are_refused(tmp_path, layout):
    # Each would be a class the models output but never see.
    train = tmp_path / "train" if layout == "splits" else tmp_path
    _write_images(train, {"a": 4, "b": 4})
    (train / "c").mkdir()
    (train / "d").mkdir()
    (train / "d" / "notes.txt").write_text("no image")
    if layout == "splits":
        _write_images(tmp_path / "test", {"a": 1})  # a held-out split may lack classes
    expected = f"{str(train)!r}: class folder(s) c, d hold no images"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_dataset(config(dataset="imagefolder", data_path=str(tmp_path)))


def test_imagefolder_reads_tiff_images(tmp_path):
    _write_images(tmp_path, {"a": 4, "b": 4})
    from PIL import Image

    Image.fromarray(np.full((7, 7, 3), 200, np.uint8)).save(tmp_path / "b" / "x.tif")
    splits = load_dataset(config(dataset="imagefolder", data_path=str(tmp_path)))
    assert len(splits.train) + len(splits.test) == 9


@pytest.mark.parametrize("layout", ["classes", "splits"])
def test_imagefolder_needs_two_classes(tmp_path, layout):
    train = tmp_path / "train" if layout == "splits" else tmp_path
    _write_images(train, {"only": 5})
    if layout == "splits":
        _write_images(tmp_path / "val", {"only": 1})
    expected = f"{str(train)!r}: every training image has the same class (only)"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_dataset(config(dataset="imagefolder", data_path=str(tmp_path)))


def test_imagefolder_needs_two_classes_left_after_the_held_out_split(tmp_path):
    # One image per class: the held-out 20% takes one class whole.
    _write_images(tmp_path, {"cat": 1, "dog": 1})
    with pytest.raises(ConfigError, match="less its held-out 20%: every training image has the same class"):
        load_dataset(config(dataset="imagefolder", data_path=str(tmp_path)))


def test_imagefolder_follows_symlinked_folders_once(tmp_path):
    _write_images(tmp_path / "tree", {"cat": 2, "dog": 3})
    _write_images(tmp_path / "more", {"cat": 5})
    (tmp_path / "tree" / "cat" / "more").symlink_to(tmp_path / "more" / "cat")
    (tmp_path / "tree" / "cat" / "loop").symlink_to(tmp_path / "tree")  # ends, read once
    splits = load_dataset(config(dataset="imagefolder", data_path=str(tmp_path / "tree")))
    assert len(splits.train) + len(splits.test) == 10


@pytest.mark.parametrize("inside", ["runs/distill", ".", ".runs/distill"])
def test_imagefolder_output_directory_inside_the_tree_is_refused(tmp_path, inside):
    # Its plots would be a class of the next run; a hidden one is not read.
    _write_images(tmp_path, {"cat": 5, "dog": 5})
    settings = config(dataset="imagefolder", data_path=str(tmp_path), output_dir=str(tmp_path / inside))
    if inside == ".runs/distill":
        assert len(load_dataset(settings).class_names) == 2
        return
    with pytest.raises(ConfigError, match="lies inside the image tree .*: choose an --output-dir outside it"):
        load_dataset(settings)


@pytest.mark.parametrize("damage", ["truncated", "garbage after the signature"])
def test_imagefolder_unreadable_image_is_an_error_naming_it(tmp_path, damage):
    _write_images(tmp_path, {"a": 4, "b": 4})
    bad = tmp_path / "b" / "3.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:8] + b" garbage")
    with pytest.raises(ConfigError, match=re.escape(f"{str(bad)!r}: not a readable image")):
        splits = load_dataset(config(dataset="imagefolder", data_path=str(tmp_path)))
        [splits.test[i] for i in range(len(splits.test))]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_check_images_lists_every_unreadable_image_of_the_run(tmp_path, num_workers):
    from srm_ext.distill.image_check import check_images

    _write_images(tmp_path / "train", {"a": 12, "b": 12})
    _write_images(tmp_path / "test", {"a": 2, "b": 2})
    # The statistics pass over unreadable images, for the check to list them all.
    settings = dict(dataset="imagefolder", data_path=str(tmp_path), image_size=7, check_images=True)
    check_images(load_dataset(config(**settings)), num_workers)  # all readable
    bad = [tmp_path / "train" / "a" / f"{i}.png" for i in range(1, 12, 2)] + [tmp_path / "test" / "b" / "1.png"]
    for path in bad:
        path.write_bytes(path.read_bytes()[:20])
    splits = load_dataset(config(**settings))
    with pytest.raises(ConfigError) as error:
        check_images(splits, num_workers)
    message = str(error.value)
    assert message.startswith("7 image(s) cannot be read: ")
    assert [f"{str(path)!r}: not a readable image" in message for path in bad] == [True] * 7
    # Only the images the run uses: a limit leaves the others unread.
    limited = load_dataset(config(**settings, train_limit=2, test_limit=1))
    check_images(limited, num_workers)
    # Splits held in memory were read as they loaded.
    check_images(load_dataset(config(dataset="digits")), num_workers)


def test_check_images_names_ten_files_and_counts_the_rest(tmp_path):
    from srm_ext.distill.image_check import check_images

    _write_images(tmp_path / "train", {"a": 12, "b": 2})
    _write_images(tmp_path / "test", {"a": 1, "b": 1})
    for path in (tmp_path / "train" / "a").iterdir():
        path.write_bytes(b"not an image")
    settings = dict(dataset="imagefolder", data_path=str(tmp_path), image_size=7, check_images=True)
    splits = load_dataset(config(**settings))
    with pytest.raises(ConfigError, match=r"^12 image\(s\) cannot be read: .*; and 2 more$") as error:
        check_images(splits)
    assert str(error.value).count("not a readable image") == 10
    for path in (tmp_path / "train" / "b").iterdir():  # no statistics at all
        path.write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="no training image under .* can be read"):
        load_dataset(config(**settings))


def test_imagefolder_float_tiff_is_scaled_from_the_unit_range(tmp_path):
    # convert("RGB") alone would truncate 0..1 floats to 0 and 1.
    from PIL import Image

    _write_images(tmp_path, {"a": 4, "b": 4})
    ramp = np.linspace(0, 1, 49, dtype=np.float32).reshape(7, 7)
    Image.fromarray(ramp).save(tmp_path / "b" / "ramp.tif")
    Image.fromarray(ramp * 2).save(tmp_path / "a" / "bright.tif")
    splits = load_dataset(config(dataset="imagefolder", data_path=str(tmp_path), image_size=7))
    dataset = splits.train.dataset
    image, _ = dataset[dataset.files.index(tmp_path / "b" / "ramp.tif")]
    assert torch.equal(image[0], torch.from_numpy(np.rint(ramp * 255).astype(np.uint8)))
    with pytest.raises(ConfigError, match=r"bright.tif': float image has values in \[0, 2\]"):
        dataset[dataset.files.index(tmp_path / "a" / "bright.tif")]


def test_imagefolder_16bit_png_is_scaled_by_65535(tmp_path):
    from PIL import Image

    ramp = np.linspace(0, 65535, 81).round().astype(np.uint16).reshape(9, 9)
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(ramp).save(tmp_path / split / name / "ramp.png")
    with Image.open(tmp_path / "train" / "a" / "ramp.png") as image:
        assert image.mode == "I;16"
    # at its own size Pillow's resize is a copy, so the values are exact
    splits = load_dataset(config(dataset="imagefolder", data_path=str(tmp_path), image_size=9))
    check_splits(splits, 2, 2, 2, 3, 9)
    expected = torch.from_numpy(np.rint(ramp / 65535 * 255).astype(np.uint8))
    assert all(torch.equal(channel, expected) for channel in splits.train[0][0])
    resized = load_dataset(config(dataset="imagefolder", data_path=str(tmp_path), image_size=12))
    assert (resized.train[0][0] == 255).float().mean() < 0.05


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
    assert not torch.equal(epoch_labels(single, 1), epoch_labels(single, 2))  # fresh each epoch
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


class _SignalProbe(torch.utils.data.Dataset):
    """Each sample: whether the process loading it ignores SIGINT, and whether
    it blocks SIGINT or SIGTERM."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        blocked = bool(signal.pthread_sigmask(signal.SIG_BLOCK, []) & _STOP_SIGNALS)
        return torch.tensor([ignored, blocked]), i % 2


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
needs_signal_masks = pytest.mark.skipif(
    not hasattr(signal, "pthread_sigmask"), reason="needs POSIX signal masks"
)


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler, as in a terminal: a background job (CI)
    starts with SIGINT ignored, which the workers would inherit."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@needs_signal_masks
def test_loader_workers_leave_ctrl_c_to_the_main_process(python_sigint_handler, monkeypatch):
    # Ctrl-C reaches the workers too; one dying of it would be reported as a
    # worker crash instead of the interrupt.
    probe = _SignalProbe()
    splits = load_dataset(config(dataset="digits"))
    splits.train, splits.test = probe, probe
    masks_at_start = []
    real_start = _MultiProcessingDataLoaderIter.__init__

    def start(self, loader):
        masks_at_start.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        real_start(self, loader)

    monkeypatch.setattr(_MultiProcessingDataLoaderIter, "__init__", start)
    mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    for loader in make_loaders(splits, batch_size=2, seed=0, num_workers=1):
        samples = torch.cat([batch for batch, _ in loader])
        assert samples[:, 0].all()  # SIGINT ignored in the workers
        assert not samples[:, 1].any()  # and nothing left blocked there
    # Blocked while the workers started (they inherit the mask), then restored.
    assert len(masks_at_start) == 2 and all(_STOP_SIGNALS <= mask for mask in masks_at_start)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask_before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the main's is kept


@needs_signal_masks
def test_a_ctrl_c_while_the_workers_start_stops_only_the_main_process(
    python_sigint_handler, monkeypatch, capfd
):
    # The signal reaches each worker before its init function can ignore it;
    # unblocked, it would kill the worker with a traceback of its own. In the
    # main process, Python runs its handler in the main thread even when
    # another thread took the signal: it must wait until the workers are
    # started, as a KeyboardInterrupt raised inside a fork callback is dropped.
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    real_loop = worker_module._worker_loop

    def slow_to_start(*args, **kwargs):  # as a worker still importing
        time.sleep(0.5)
        return real_loop(*args, **kwargs)

    monkeypatch.setattr(worker_module, "_worker_loop", slow_to_start)
    workers, started = [], []
    real_start = _MultiProcessingDataLoaderIter.__init__

    def start_then_interrupt(self, loader):
        real_start(self, loader)
        workers.extend(self._workers)
        for worker in self._workers:
            os.kill(worker.pid, signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # as taken by another thread
        started.append(True)

    monkeypatch.setattr(_MultiProcessingDataLoaderIter, "__init__", start_then_interrupt)
    loader = InterruptSafeDataLoader(
        _SignalProbe(), batch_size=2, num_workers=2, multiprocessing_context="fork"
    )
    with pytest.raises(KeyboardInterrupt):
        for _ in loader:
            pass
    assert started == [True]  # the interrupt came once the workers were started
    gc.collect()  # the interrupted iterator shuts its workers down
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert "KeyboardInterrupt" not in capfd.readouterr().err


@needs_signal_masks
def test_a_sigterm_from_a_scheduler_stops_a_worker_quietly():
    # torch lets a worker die of a SIGTERM that its parent did not send, which
    # the main process would report as a crash instead of stopping cleanly.
    loader = InterruptSafeDataLoader(_SignalProbe(), batch_size=1, num_workers=1)
    iterator = iter(loader)
    next(iterator)
    (worker,) = iterator._workers
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # another process
    worker.join(timeout=30)
    assert worker.exitcode == 0
    del iterator


def test_batch_preprocessor_normalises_and_augments():
    g = torch.Generator().manual_seed(0)
    n, p = 16, 1
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    pre = BatchPreprocessor(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), pad=p, flip=True)
    evaluated = pre(images, train=False)
    torch.testing.assert_close(evaluated, (images.float() / 255 - 0.5) / 0.25)
    torch.manual_seed(0)
    augmented = pre(images, train=True)
    assert augmented.shape == evaluated.shape
    torch.manual_seed(0)
    assert torch.equal(augmented, pre(images, train=True))  # draws come from the torch RNG

    # Normalised first, then zero-padded: each image is one crop of its padded
    # normalised self, or that crop mirrored.
    padded = F.pad(evaluated, (p, p, p, p))
    offsets = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
    mirrored, shifted = [], []
    for image, source in zip(augmented, padded):
        crops = [((dy, dx), source[:, dy : dy + 8, dx : dx + 8]) for dy, dx in offsets]
        matches = [
            (flip, offset)
            for offset, crop in crops
            for flip, candidate in ((False, crop), (True, crop.flip(-1)))
            if torch.equal(image, candidate)
        ]
        assert matches, "not a crop of the padded image, nor a mirrored one"
        mirrored.append(all(flip for flip, _ in matches))
        shifted.append(all(offset != (p, p) for _, offset in matches))
    # With 16 images the seed draws both kinds of each choice.
    assert 0 < sum(mirrored) < n and 0 < sum(shifted) < n
    assert not torch.equal(augmented, evaluated)
