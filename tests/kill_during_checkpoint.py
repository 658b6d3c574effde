"""
Runs a training script and SIGKILLs it at a given point of the save of one checkpoint, so that tests can interrupt a
real save deterministically.

    python tests/kill_during_checkpoint.py <step>:<point> examples/train.py <train.py arguments>

Points of the save of `step_<step>` (`pix2seq_hf.checkpointing.save_checkpoint`):

- "started": the `step_<step>.partial` folder exists, Accelerate's `save_state` has not written into it yet;
- "state_written": `save_state` has written every file, the completeness marker is not written;
- "renamed": the folder is complete and renamed to `step_<step>`, older checkpoints are not pruned yet.

The kill is placed by wrapping the functions the save calls (in this process only): the package holds no test hook.
"""

import functools
import os
import runpy
import signal
import sys
from pathlib import Path

import accelerate

from pix2seq_hf import checkpointing


POINTS = ("started", "state_written", "renamed")


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(step: int, point: str) -> None:
    """Wraps the functions of the save so that this process is killed at `point` of the save of `step_<step>`."""
    if point not in POINTS:
        raise ValueError(f"Unknown kill point {point!r}; choose one of {POINTS}.")
    partial_name = f"step_{step}{checkpointing.PARTIAL_SUFFIX}"
    save_state = accelerate.Accelerator.save_state

    @functools.wraps(save_state)
    def killing_save_state(self, output_dir=None, *args, **kwargs):
        saving = output_dir is not None and Path(output_dir).name == partial_name
        if saving and point == "started":
            _kill()
        result = save_state(self, output_dir, *args, **kwargs)
        if saving and point == "state_written":
            _kill()
        return result

    fsync_path = checkpointing._fsync_path

    @functools.wraps(fsync_path)
    def killing_fsync_path(path):
        fsync_path(path)
        # The save syncs the output folder right after renaming the checkpoint into it.
        if point == "renamed" and checkpointing.is_complete_checkpoint(Path(path) / f"step_{step}"):
            _kill()

    accelerate.Accelerator.save_state = killing_save_state
    checkpointing._fsync_path = killing_fsync_path


def main() -> None:
    kill_at, script, *argv = sys.argv[1:]
    step, point = kill_at.split(":")
    install(int(step), point)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
