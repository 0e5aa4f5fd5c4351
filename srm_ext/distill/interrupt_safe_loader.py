"""A DataLoader whose worker processes leave Ctrl-C and SIGTERM to the main process.

Ctrl-C reaches the whole process group, and so does a scheduler's SIGTERM. A
worker that died of one would turn the main process's clean stop (with its
resume hint) into a "DataLoader worker exited unexpectedly" error, and one hit
while it starts up prints a traceback of its own. So the main process blocks
both signals while it starts the workers, which inherit the blocked mask; each
worker ignores SIGINT before it unblocks them, so a Ctrl-C that arrived in
between is dropped, and a SIGTERM stops it quietly (torch's worker loop exits
on KeyboardInterrupt, which the CLI's SIGTERM handler raises). The main process
takes any signal it held back once the workers are started.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader

__all__ = ["InterruptSafeDataLoader"]

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# POSIX only; elsewhere the workers just ignore SIGINT.
_CAN_BLOCK = hasattr(signal, "pthread_sigmask")


class InterruptSafeDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` (same arguments) whose workers
    leave Ctrl-C to the main process, from the moment they start."""

    def __init__(
        self, *args: Any, worker_init_fn: Callable[[int], None] | None = None, **kwargs: Any
    ) -> None:
        init = functools.partial(_leave_stop_signals_to_the_main_process, worker_init_fn)
        super().__init__(*args, worker_init_fn=init, **kwargs)

    def __iter__(self):
        if self.num_workers == 0 or not _CAN_BLOCK:
            return super().__iter__()
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return super().__iter__()  # starts the workers
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _leave_stop_signals_to_the_main_process(
    user_init: Callable[[int], None] | None, worker_id: int
) -> None:
    # Runs inside torch's worker loop, which stops quietly on KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _CAN_BLOCK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if user_init is not None:
        user_init(worker_id)
