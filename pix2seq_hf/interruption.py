"""
Stopping a training run cleanly on Ctrl-C (SIGINT) or SIGTERM: the step under way is finished, a complete checkpoint is
written, and the run exits with the conventional status (130 for SIGINT, 143 for SIGTERM). A second Ctrl-C exits at
once (`KeyboardInterrupt`), as a user pressing it twice expects.
"""

from __future__ import annotations

import os
import signal
import threading


class StopOnSignal:
    """
    Turns SIGINT and SIGTERM into a request to stop, checked by the training loop between steps (`should_stop`).

    Use it as a context manager around the training loop: the previous handlers come back at its end. Handlers can
    only be installed from the main thread; elsewhere the object does nothing (and never asks to stop).

    Attributes:
        received (`int` or `None`): the first signal received, if any.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # already stopping
        self.received = signum
        # `os.write`, not logging: a handler may run while the logging lock is held.
        os.write(
            2,
            f"\n{name}: finishing the current step, then saving a checkpoint to resume from (Ctrl-C again to quit "
            "at once without it).\n".encode(),
        )

    def should_stop(self, accelerator=None) -> bool:
        """
        Whether a stop was asked, in this process or (with `accelerator`, every process calling it at the same step)
        in any process of the run, so that all stop at the same step.
        """
        if accelerator is None or accelerator.num_processes == 1:
            return self.received is not None
        if self.received is not None:
            accelerator.set_trigger()
        return accelerator.check_trigger()

    @property
    def exit_code(self) -> int:
        """The conventional exit status of a process stopped by the signal received (128 + its number)."""
        return 128 + (self.received or signal.SIGINT)


__all__ = ["StopOnSignal"]
