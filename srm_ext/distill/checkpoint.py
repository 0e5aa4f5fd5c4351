"""Atomic checkpoints of plain state, and the RNG states that make resuming exact.

Everything saved is plain data (state dicts, tensors, numbers, strings, lists,
dicts), so checkpoints load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import glob
import os
import pickle
import random
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .config import ConfigError
from .distributed import DistributedContext

__all__ = [
    "atomic_save",
    "cpu_state_dict",
    "load_checkpoint",
    "rng_state",
    "gather_rng_states",
    "set_rng_state",
    "seed_everything",
]


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then
    ``os.replace``: a crash leaves either the old file or the new one, never half.
    A temp file that a killed writer left beside ``path`` goes with this save."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temporaries(path)
    # Not mkstemp, which makes the file private (0600): created like any other
    # file (0666 less the umask), so that others can load a shared run.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _remove_abandoned_temporaries(path: Path) -> None:
    """Removes the temp files of ``path`` whose writer process has ended: a
    SIGKILL mid-save gives it no chance to, and over resumes they pile up."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]{{32}}\.tmp")
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = pattern.fullmatch(tmp.name)
        if match and not _process_alive(int(match[1])):
            tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # Windows' os.kill would end the process
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def cpu_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` detached on the CPU, keeping its module versions
    (``_metadata``), which ``load_state_dict`` reads to upgrade weights saved by
    an older version of a module."""
    state = model.state_dict()
    weights = type(state)((name, value.detach().cpu()) for name, value in state.items())
    if hasattr(state, "_metadata"):
        weights._metadata = state._metadata
    return weights


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not supported on every platform.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads tensors and plain containers only (``weights_only=True``); a file
    that needs arbitrary pickled objects, or a damaged one, raises ConfigError
    naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported operand" in str(exc):  # bytes no pickler wrote: text, an image, ...
            raise ConfigError(
                f"{os.fspath(path)}: not a checkpoint (torch.save writes no such bytes)"
            ) from exc
        # torch's message offers to load it unsafely; name what it holds instead.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        holds = f" (it holds a {found.group(1)})" if found else ""
        raise ConfigError(
            f"{os.fspath(path)}: refused: the checkpoint needs arbitrary pickled objects, "
            f"which are never loaded{holds}; save a state_dict (model.state_dict()), "
            "which holds tensors only"
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f"{os.fspath(path)}: cannot read the checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    # A damaged or foreign file fails wherever its bytes stop making sense:
    # in the zip reader (RuntimeError) or in the unpickler (the others).
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError) as exc:
        raise ConfigError(
            f"{os.fspath(path)}: truncated or malformed checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and Python RNG states as tensors and numbers."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states(
    context: DistributedContext, extra: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every process's :func:`rng_state` with ``extra`` added, in rank order (a
    collective under DDP)."""
    state = {**rng_state(), **(extra or {})}
    if not context.enabled:
        return [state]
    states: list[Any] = [None] * context.world_size
    dist.all_gather_object(states, state)
    return states


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    py_state = state["python"]
    random.setstate(
        (py_state["version"], tuple(py_state["internal"].tolist()), py_state["gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
