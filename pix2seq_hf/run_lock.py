"""
One training run per output folder: an exclusive `fcntl` lock on `<output_dir>/_run.lock`, held by the run's main
process from its start to its end.

Two runs writing into one folder remove each other's checkpoints (each save clears the `.partial` folders it finds), so
a second run is refused at its start, naming the process that holds the folder. The operating system releases the lock
when its process ends, however it ends: a lock file left by a killed run (`kill -9`, out of memory, power cut) holds no
lock, and the next run takes it over (and says so). The file name starts with `_`, which uploads to the Hub leave out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from pathlib import Path


logger = logging.getLogger(__name__)

LOCK_FILE_NAME = "_run.lock"


class OutputDirInUseError(RuntimeError):
    """Another process holds the output folder's lock."""


class OutputDirLock:
    """
    The lock of a run's output folder, as a context manager (or `acquire()` / `release()`).

    Args:
        output_dir (`str` or `os.PathLike`): the run's output folder (created if needed).

    Raises (on `acquire`):
        `OutputDirInUseError` naming the process (PID and host) that holds the folder.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE_NAME
        self._fd: int | None = None

    def acquire(self) -> OutputDirLock:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            who = f"process {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
            raise OutputDirInUseError(
                f"--output_dir {self.output_dir} is in use by another run ({who}, holding {self.path}): two runs in "
                "one folder would remove each other's checkpoints. Wait for that run to end or stop it, or choose "
                "another --output_dir."
            ) from None
        # A file still naming a process: that run ended without releasing the lock (it was killed).
        previous = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
        if previous:
            logger.warning(
                f"Taking over {self.path} from process {' on '.join(previous[:2])}, which ended without releasing it "
                "(killed?)."
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # Emptied first: a file that still names its process tells the next run that this one was killed.
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def hold_output_dir(output_dir: str | os.PathLike):
    """
    The output folder's lock for the main process of a run (`RANK` 0 or unset, as `torchrun` and `accelerate launch`
    set it), a context that does nothing for the other processes.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return OutputDirLock(output_dir)


__all__ = ["LOCK_FILE_NAME", "OutputDirInUseError", "OutputDirLock", "hold_output_dir"]
