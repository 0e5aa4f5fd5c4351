"""Files from strangers: data pickles and checkpoints never run code, and
damaged files give an error that names them."""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import subprocess
import uuid

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


class _Python2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2's str (BINSTRING), the layout of the
    CIFAR batches as published."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_python2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_str
    dispatch[str] = _save_python2_str


def _sample_batch():
    rng = np.random.default_rng(1)
    return {
        b"data": rng.integers(0, 256, (3, 3 * 32 * 32), dtype=np.uint8),
        b"labels": [7, 0, 3],
        b"batch_label": b"training batch 1 of 5",
        b"empty": b"",
    }


def _assert_same_batch(loaded, batch):
    assert loaded.keys() == batch.keys()
    assert loaded[b"data"].dtype == np.uint8
    assert np.array_equal(loaded[b"data"], batch[b"data"])
    assert [loaded[k] for k in (b"labels", b"batch_label", b"empty")] == [
        batch[k] for k in (b"labels", b"batch_label", b"empty")
    ]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_batches_load_in_every_pickle_protocol(tmp_path, protocol):
    # Protocols 0-2 rebuild bytes through _codecs.encode, 5 arrays through
    # numpy's _frombuffer; the default protocol differs between Pythons.
    batch = _sample_batch()
    path = tmp_path / "batch"
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    _assert_same_batch(load_data_pickle(path), batch)


def test_batches_load_as_python_2_wrote_them(tmp_path):
    batch = _sample_batch()
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(batch)
    assert buffer.getvalue().startswith(b"\x80\x02}q\x00(U\x04data")
    path = tmp_path / "batch"
    path.write_bytes(buffer.getvalue())
    _assert_same_batch(load_data_pickle(path), batch)


@pytest.mark.parametrize("codec", ["rot13", "zlib_codec"])
def test_bytes_encoded_with_another_codec_are_refused(tmp_path, codec):
    path = tmp_path / "batch"
    path.write_bytes(f"c_codecs\nencode\n(Vabc\nV{codec}\ntR.".encode())
    with pytest.raises(ConfigError, match=f"refused to unpickle: it encodes bytes with '{codec}'"):
        load_data_pickle(path)


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
    # A whole model saved as a file: the message names its class, not torch's unsafe options.
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.raises(ConfigError, match=re.escape(
        "model.pt: refused: the checkpoint needs arbitrary pickled objects, which are never "
        "loaded (it holds a torch.nn.modules.linear.Linear); save a state_dict (model.state_dict())"
    )):
        load_checkpoint(tmp_path / "model.pt")


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


@pytest.mark.skipif(os.name != "posix", reason="POSIX process ids")
def test_a_save_removes_the_temp_files_that_killed_writers_left(tmp_path):
    # A SIGKILL mid-save leaves its temp file; the next save of that path
    # removes it, but never one of a writer still running or of another path.
    ended = subprocess.Popen(["true"])
    ended.wait()
    name = lambda target, pid: tmp_path / f".{target}.{pid}.{uuid.uuid4().hex}.tmp"
    abandoned = name("checkpoint.pt", ended.pid)
    running = name("checkpoint.pt", os.getppid())
    other_path = name("model.pt", ended.pid)
    for path in (abandoned, running, other_path):
        path.write_bytes(b"half a checkpoint")
    atomic_save({"w": torch.ones(1)}, tmp_path / "checkpoint.pt")
    assert not abandoned.exists()
    assert running.exists() and other_path.exists()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["w"].item() == 1.0
