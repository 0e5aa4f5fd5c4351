"""Reading pickled datasets without running anyone's code.

A pickle can name any importable callable and have the loader call it. The
dataset formats we read (the CIFAR python folders) hold only dicts, lists,
bytes, numbers and numpy arrays, so the unpickler here resolves just the
globals that rebuild numpy arrays and bytes, in every pickle protocol, and
refuses every other one.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

from .config import ConfigError

__all__ = ["load_data_pickle"]

# The globals numpy arrays pickle through (numpy 1.x and 2.x module names);
# _frombuffer is protocol 5's.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _latin1_bytes(text: str = "", encoding: str = "latin1") -> bytes:
    """Rebuilds bytes as Python 3 pickles them under protocols 0-2:
    ``_codecs.encode(text, "latin1")``, or ``bytes()`` when empty. Only that
    codec is run: others may import modules."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _RefusedGlobal(f"it encodes bytes with {encoding!r}; only latin1 is accepted")
    return text.encode("latin1")


# Globals answered with a narrower stand-in than the real callable.
_STAND_INS = {
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "bytes"): _latin1_bytes,
    ("__builtin__", "bytes"): _latin1_bytes,
}


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _STAND_INS:
            return _STAND_INS[module, name]
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _RefusedGlobal(
            f"it refers to {module}.{name}; only arrays and plain containers are accepted"
        )


def load_data_pickle(path: str | os.PathLike) -> Any:
    """Unpickles a data file (bytes keys as in Python 2 pickles), or raises
    ConfigError naming the file when it is refused, truncated or malformed."""
    try:
        with open(path, "rb") as f:
            return _DataOnlyUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise ConfigError(f"{os.fspath(path)}: refused to unpickle: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as exc:
        raise ConfigError(
            f"{os.fspath(path)}: truncated or malformed pickle ({type(exc).__name__}: {exc})"
        ) from exc
