"""
Training checkpoints and output folders that survive a kill and are never overwritten unasked.

- A checkpoint `<output_dir>/step_N/` is written by Accelerate's `save_state` into the sibling `step_N.partial/`, then
  `training_state.json` (the step and the arguments of the run) is written last, as the mark of a complete checkpoint,
  and the folder is renamed to `step_N` (a rename is atomic). A process killed at any point leaves either the previous
  checkpoints untouched or a complete new one, plus at most a `.partial` folder that is ignored and later removed.
- `find_checkpoint(output_dir, "latest")` takes the newest complete checkpoint and logs the incomplete ones it skips.
- `check_output_dir` refuses an output folder holding a model or checkpoints of another run unless the caller resumes
  or overwrites; `write_files_atomically` writes a final model so that a kill never leaves a half-written file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

# Written last into a checkpoint: its presence marks the checkpoint complete.
TRAINING_STATE_FILE = "training_state.json"
PARTIAL_SUFFIX = ".partial"
CHECKPOINT_NAME = re.compile(r"step_(\d+)")
# Files that show that a folder holds a saved model (or the results of a finished run).
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "all_results.json")

def _fsync_path(path: Path) -> None:
    """Flushes a file or a folder entry to disk (best effort: some filesystems refuse to sync folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        _fsync_path(path)
    _fsync_path(folder)


def checkpoint_step(path: Path) -> int | None:
    """The step of a `step_N` (or `step_N.partial`) folder name, else `None`."""
    name = path.name[: -len(PARTIAL_SUFFIX)] if path.name.endswith(PARTIAL_SUFFIX) else path.name
    match = CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: Path) -> bool:
    """Whether `path` is a finished checkpoint folder: named `step_N` and holding its `training_state.json`."""
    path = Path(path)
    return (
        path.is_dir()
        and not path.name.endswith(PARTIAL_SUFFIX)
        and checkpoint_step(path) is not None
        and (path / TRAINING_STATE_FILE).is_file()
    )


def list_checkpoints(output_dir: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """
    The checkpoint folders of `output_dir`.

    Returns:
        `(complete, incomplete)`: complete `step_N` folders sorted by step, and the folders that look like
        checkpoints but are not complete (`step_N.partial` left by an interrupted save, `step_N` without
        `training_state.json`), sorted by step.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return [], []
    folders = [path for path in output_dir.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    folders.sort(key=lambda path: (checkpoint_step(path), path.name))
    complete = [path for path in folders if is_complete_checkpoint(path)]
    incomplete = [path for path in folders if not is_complete_checkpoint(path)]
    return complete, incomplete


def read_training_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The `training_state.json` of a checkpoint: `completed_steps` and, when recorded, the `run` arguments and the
    `elapsed_seconds` of the run."""
    path = Path(checkpoint) / TRAINING_STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{checkpoint} is not a complete checkpoint: it has no {TRAINING_STATE_FILE} (written last by a save, so "
            "the save was interrupted)."
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(state, dict) or not isinstance(state.get("completed_steps"), int):
        raise ValueError(f"{path} must hold a JSON object with an integer 'completed_steps', got {state!r:.200}.")
    return state


def find_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str | os.PathLike) -> Path:
    """
    Resolves a `--resume_from_checkpoint` value.

    Args:
        output_dir: the run's output folder, searched for `"latest"`.
        resume_from_checkpoint: `"latest"` (the complete `step_N` folder with the highest N in `output_dir`) or the
            path of a checkpoint folder.

    Returns:
        The checkpoint folder. Incomplete checkpoints skipped on the way are logged.

    Raises:
        `FileNotFoundError` when there is no such folder, when it is not complete, or (`"latest"`) when `output_dir`
        holds no complete checkpoint (the message lists the incomplete ones).
    """
    if str(resume_from_checkpoint) != "latest":
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"No checkpoint folder at {path}")
        if not (path / TRAINING_STATE_FILE).is_file():
            raise FileNotFoundError(
                f"{path} is not a complete checkpoint: it has no {TRAINING_STATE_FILE}, which a save writes last (the "
                "save was interrupted). Resume from an earlier checkpoint, or with 'latest'."
            )
        return path
    complete, incomplete = list_checkpoints(output_dir)
    latest = complete[-1] if complete else None
    for path in incomplete:
        if latest is None or checkpoint_step(path) >= checkpoint_step(latest):
            logger.warning(f"Skipping {path}: an interrupted save (no {TRAINING_STATE_FILE}).")
    if latest is None:
        found = f" (incomplete: {', '.join(p.name for p in incomplete)})" if incomplete else ""
        raise FileNotFoundError(
            f"--resume_from_checkpoint latest: no complete step_N checkpoint in {output_dir}{found}."
        )
    return latest


def check_same_run(checkpoint: Path, state: Mapping[str, Any], run: Mapping[str, Any]) -> None:
    """
    Raises `ValueError` when the arguments recorded in a checkpoint's `state["run"]` differ from `run` on a name
    both have, naming each difference. A checkpoint without recorded arguments is accepted (with a warning).
    """
    recorded = state.get("run")
    if not isinstance(recorded, Mapping):
        logger.warning(f"{checkpoint} records no run arguments; cannot check that it belongs to this run.")
        return
    differences = [
        f"{name}={recorded[name]!r} (now {run[name]!r})"
        for name in sorted(set(recorded) & set(run))
        if recorded[name] != run[name]
    ]
    if differences:
        raise ValueError(
            f"{checkpoint} belongs to another run: it was written with " + ", ".join(differences) + ". Resume with "
            "the arguments of that run, or start a new run (another --output_dir, or --overwrite_output_dir to "
            "replace it)."
        )


def check_saved_objects(checkpoint: Path, registered: Sequence[str]) -> None:
    """
    Raises `ValueError` when `checkpoint` holds no saved state for one of the objects the run registered for
    checkpointing (`accelerator.register_for_checkpointing`; Accelerate saves the i-th as `custom_checkpoint_{i}.pkl`),
    so that resuming names the option that differs instead of failing inside Accelerate's `load_state`.

    Args:
        checkpoint (`Path`): a complete checkpoint folder.
        registered (`Sequence[str]`): what each registered object is, in registration order (for the message, e.g.
            `"the weight average (--ema_decay)"`).
    """
    missing = [
        name for index, name in enumerate(registered) if not (checkpoint / f"custom_checkpoint_{index}.pkl").exists()
    ]
    if missing:
        raise ValueError(
            f"{checkpoint} holds no saved state of {', '.join(missing)}: it was written by a run without it. Resume "
            "with the arguments of that run, or start a new run (another --output_dir, or --overwrite_output_dir to "
            "replace it)."
        )


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    run: Mapping[str, Any] | None = None,
    total_limit: int | None = None,
    elapsed_seconds: float | None = None,
) -> Path:
    """
    Saves the training state atomically as `<output_dir>/step_<step>/`. Call it on every process.

    Accelerate's `save_state` writes weights, optimiser, scheduler, sampler and random states into
    `step_<step>.partial/`; then the main process writes `training_state.json` (`completed_steps`, `run` and
    `elapsed_seconds`), flushes the files to disk and renames the folder to `step_<step>` (replacing an older
    checkpoint of the same step).
    Leftover `.partial` folders of earlier interrupted saves are removed first; with `total_limit`, the oldest complete
    checkpoints beyond the newest `total_limit` are removed after the rename (the one just saved is always kept).

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator (prepared model, optimiser, ...).
        output_dir: the run's output folder.
        step (`int`): the number of completed optimisation steps.
        run (`Mapping`, *optional*): the arguments that define the run (JSON-serialisable), checked on resume by
            `check_same_run`.
        total_limit (`int`, *optional*): keep at most this many complete checkpoints.
        elapsed_seconds (`float`, *optional*): wall time the run has spent so far, so that a time limit (and a
            learning-rate decay to it) counts the resumed parts too.

    Returns:
        The checkpoint folder.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"step_{step}"
    partial = output_dir / f"step_{step}{PARTIAL_SUFFIX}"
    if accelerator.is_main_process:
        for stale in output_dir.glob(f"step_*{PARTIAL_SUFFIX}"):
            if stale.is_dir() and checkpoint_step(stale) is not None:
                shutil.rmtree(stale)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"completed_steps": int(step), "run": dict(run) if run is not None else None}
        if elapsed_seconds is not None:
            state["elapsed_seconds"] = round(float(elapsed_seconds), 3)
        (partial / TRAINING_STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        _fsync_tree(partial)
        replaced = None
        if final.exists():
            replaced = output_dir / f"step_{step}.replaced"
            if replaced.exists():
                shutil.rmtree(replaced)
            os.replace(final, replaced)
        os.replace(partial, final)
        _fsync_path(output_dir)
        if replaced is not None:
            shutil.rmtree(replaced)
        logger.info(f"Saved checkpoint {final}")
        if total_limit is not None:
            complete, _ = list_checkpoints(output_dir)
            older = [path for path in complete if path != final]
            for path in older[: max(0, len(older) - (total_limit - 1))]:
                shutil.rmtree(path)
                logger.info(f"Removed {path} (keeping {total_limit} checkpoints).")
    accelerator.wait_for_everyone()
    return final


def output_dir_contents(output_dir: str | os.PathLike) -> list[str]:
    """The names of the model files and checkpoint folders (complete or not) in `output_dir`."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    complete, incomplete = list_checkpoints(output_dir)
    model_files = [name for name in MODEL_FILES if (output_dir / name).is_file()]
    return model_files + [path.name for path in complete + incomplete]


def check_output_dir(output_dir: str | os.PathLike, overwrite_output_dir: bool, resuming: bool) -> list[Path]:
    """
    Checks that a run may write into `output_dir`.

    A folder that holds a saved model (`config.json`, weights, `all_results.json`) or checkpoints is refused unless
    the run resumes (`resuming`) or replaces it (`overwrite_output_dir`). Read-only: call it on every process.

    Returns:
        With `overwrite_output_dir`, the checkpoint folders of the earlier run, which the caller removes (see
        `remove_checkpoints`) so that `latest` can never pick them up; otherwise an empty list. The earlier model
        files are left in place until the new model replaces them.

    Raises:
        `ValueError` when both `overwrite_output_dir` and `resuming` are set; `FileExistsError` naming what the folder
        holds when it is refused.
    """
    if overwrite_output_dir and resuming:
        raise ValueError(
            "--overwrite_output_dir starts a new run in the folder and --resume_from_checkpoint continues the one "
            "there: pass one of them."
        )
    found = output_dir_contents(output_dir)
    if not found or resuming:
        return []
    if not overwrite_output_dir:
        shown = ", ".join(found[:8]) + (" ..." if len(found) > 8 else "")
        raise FileExistsError(
            f"--output_dir {output_dir} already holds a model or checkpoints of another run ({shown}). Pass "
            "--resume_from_checkpoint latest to continue that run, --overwrite_output_dir to replace it, or choose "
            "another --output_dir."
        )
    complete, incomplete = list_checkpoints(output_dir)
    return complete + incomplete


def remove_checkpoints(paths: list[Path]) -> None:
    """Removes checkpoint folders (those `check_output_dir` returns with `overwrite_output_dir`), logging each."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
            logger.info(f"--overwrite_output_dir: removed {path} of the earlier run.")


def write_files_atomically(output_dir: str | os.PathLike, write: Callable[[Path], None]) -> list[Path]:
    """
    Writes files into `output_dir` so that a kill never leaves a half-written one in place of a good one.

    `write(folder)` fills a temporary sibling folder; its files are flushed to disk, then each is moved into
    `output_dir` with `os.replace` (atomic per file).

    Args:
        output_dir: the destination folder (created if needed).
        write (`Callable[[Path], None]`): writes the files into the folder it is given, e.g.
            `lambda folder: model.save_pretrained(folder)`.

    Returns:
        The paths of the files written into `output_dir`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / f".saving{PARTIAL_SUFFIX}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    write(staging)
    _fsync_tree(staging)
    written = []
    for source in sorted(staging.iterdir()):
        target = output_dir / source.name
        if source.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(source, target)
        written.append(target)
    _fsync_path(output_dir)
    shutil.rmtree(staging)
    return written


__all__ = [
    "TRAINING_STATE_FILE",
    "check_output_dir",
    "check_same_run",
    "check_saved_objects",
    "find_checkpoint",
    "is_complete_checkpoint",
    "list_checkpoints",
    "read_training_state",
    "remove_checkpoints",
    "save_checkpoint",
    "write_files_atomically",
]
