"""Files from strangers: data pickles and checkpoints never run code, and
damaged files give an error that names them."""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
import torch

from srm_ext.distill.checkpoint import atomic_save, load_checkpoint
from srm_ext.distill.config import ConfigError
from srm_ext.distill.data import load_cifar
from srm_ext.distill.safe_pickle import load_data_pickle


class _RunsCode:
    """Unpickling this calls os.system: what a crafted dataset file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_cifar_folder(root, payload=None, n=4):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "test_batch"):
        batch = {
            b"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
        }
        if payload is not None and name == "test_batch":
            batch[b"extra"] = payload
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def test_plain_cifar_batches_load(tmp_path):
    splits = load_cifar(write_cifar_folder(tmp_path / "cifar"))
    assert splits is not None


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    root = write_cifar_folder(tmp_path / "cifar", payload=_RunsCode(marker))
    with pytest.raises(ConfigError, match=r"test_batch: refused to unpickle: .*system"):
        load_cifar(root)
    assert not marker.exists()


@pytest.mark.parametrize("global_name", [b"builtins\neval", b"subprocess\nPopen", b"torch\nload"])
def test_any_other_global_is_refused(tmp_path, global_name):
    path = tmp_path / "batch"
    path.write_bytes(b"c" + global_name + b"\n(S'1'\ntR.")  # protocol 0: GLOBAL, call
    with pytest.raises(ConfigError, match="refused to unpickle"):
        load_data_pickle(path)


def test_truncated_pickle_names_the_file(tmp_path):
    root = write_cifar_folder(tmp_path / "cifar")
    data = (root / "data_batch_1").read_bytes()
    (root / "data_batch_1").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"data_batch_1: truncated or malformed pickle"):
        load_cifar(root)


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "epoch": 2, "history": [1.5, 2.5]}
    atomic_save(state, tmp_path / "checkpoint.pt")
    loaded = load_checkpoint(tmp_path / "checkpoint.pt")
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], torch.arange(3.0))


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_checkpoint_is_created_with_the_permissions_of_any_other_file(tmp_path):
    # A shared run directory: others must be able to load models and checkpoints.
    previous = os.umask(0o022)
    try:
        atomic_save({"w": torch.ones(1)}, tmp_path / "model.pt")
        (tmp_path / "results.json").write_text("{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "hook": _RunsCode(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"checkpoint.pt: refused: the checkpoint needs arbitrary pickled objects"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists()


@pytest.mark.parametrize("kept", [0.9, 0.5, 0.1, 0.01])
def test_a_checkpoint_cut_anywhere_is_one_error_naming_the_file(tmp_path, kept):
    # Where the bytes stop decides what fails: the zip directory, a record's
    # seek (OSError) or the unpickler.
    atomic_save({"w": torch.randn(1000), "history": [{"loss": 1.0}] * 50, "v": torch.randn(5000)},
                tmp_path / "checkpoint.pt")
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(ConfigError, match=r"checkpoint\.pt: (cannot read the checkpoint|truncated or malformed checkpoint) \("):
        load_checkpoint(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize(
    "text, message",
    [
        ("<html><body>not found</body></html>\n", "not a checkpoint (torch.save writes no such bytes)"),
        ("just some words in a text file\n" * 10, "truncated or malformed checkpoint"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_named(tmp_path, text, message):
    # Whichever way the unpickler fails on it, never as a file that needs
    # arbitrary objects.
    (tmp_path / "notes.txt").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"notes.txt: {message}")):
        load_checkpoint(tmp_path / "notes.txt")


def test_truncated_checkpoint_names_the_file(tmp_path):
    atomic_save({"w": torch.randn(1000)}, tmp_path / "checkpoint.pt")
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ConfigError, match=r"checkpoint.pt: truncated or malformed checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")
