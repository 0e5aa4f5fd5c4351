"""A DataLoader whose worker processes leave Ctrl-C and SIGTERM to the main process.

Ctrl-C reaches the whole process group, and so does a scheduler's SIGTERM. A
worker that died of one would turn the main process's clean stop (with its
resume hint) into a "DataLoader worker exited unexpectedly" error, and one hit
while it starts up prints a traceback of its own. Starting the workers is also
where the main process must not take the signal: Python runs its handler in
the main thread at the next bytecode, wherever that is, and the
KeyboardInterrupt it raises inside a fork callback is printed and dropped, so
the run goes on.

So while the workers start, the main process blocks both signals (the workers
inherit the mask, across exec too) and, as another thread may still receive
them, holds its Python handlers back; it delivers what it held once they are
started. Each worker ignores SIGINT, stops quietly on SIGTERM (torch's worker
loop exits on KeyboardInterrupt), and only then unblocks them.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

__all__ = ["InterruptSafeDataLoader"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# POSIX only; elsewhere the workers just ignore SIGINT.
_CAN_BLOCK = hasattr(signal, "pthread_sigmask")


class InterruptSafeDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` (same arguments) whose workers
    leave Ctrl-C and SIGTERM to the main process, from the moment they start."""

    def __init__(
        self, *args: Any, worker_init_fn: Callable[[int], None] | None = None, **kwargs: Any
    ) -> None:
        init = functools.partial(_leave_stop_signals_to_the_main_process, worker_init_fn)
        super().__init__(*args, worker_init_fn=init, **kwargs)

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        with _stop_signals_held():
            return super().__iter__()  # starts the workers


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block has run, then are delivered."""
    if not _CAN_BLOCK or threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    # A handler installed outside Python reads as None and cannot be put back.
    previous = {s: h for s in _STOP_SIGNALS if (h := signal.getsignal(s)) is not None}
    for signum in previous:
        signal.signal(signum, lambda signum, _frame: held.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # pending ones land in `held`
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


def _leave_stop_signals_to_the_main_process(
    user_init: Callable[[int], None] | None, worker_id: int
) -> None:
    # Runs inside torch's worker loop, which stops quietly on KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_quietly)
    if _CAN_BLOCK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if user_init is not None:
        user_init(worker_id)


def _stop_quietly(_signum: int, _frame: object) -> None:
    # torch's own SIGTERM handler lets a worker die of a SIGTERM that another
    # process than its parent sent, which the main process reports as a crash.
    raise KeyboardInterrupt
