"""
A training run owns its output folder and stops cleanly: a second `examples/train.py` (or `run_object_detection.py`)
on the same folder is refused at its start naming the first, a lock left by a killed run is taken over, and Ctrl-C
(SIGINT) or SIGTERM ends the run after a complete checkpoint with the conventional exit status. Real processes.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import EXAMPLES, load_example
from pix2seq_hf.checkpointing import list_checkpoints, read_training_state
from pix2seq_hf.interruption import StopOnSignal
from pix2seq_hf.run_lock import LOCK_FILE_NAME, OutputDirInUseError, OutputDirLock


# Tiny and fast, with far more steps than a test waits for: the processes are stopped by the tests.
RUN = [
    "--synthetic_train_size", "16",
    "--validation_split", "none",
    "--image_size", "64",
    "--per_device_train_batch_size", "4",
    "--num_warmup_steps", "1",
    "--seed", "3",
    "--num_threads", "1",
    "--max_train_steps", "100000",
]  # fmt: skip


def start(script: str, argv: list[str], log: Path) -> subprocess.Popen:
    """`examples/<script>.py argv` in a new Python process (this package first on its path), output into `log`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXAMPLES.parent), env.get("PYTHONPATH")]))
    with open(log, "w") as output:
        return subprocess.Popen(
            [sys.executable, str(EXAMPLES / f"{script}.py"), *argv], env=env, stdout=output, stderr=subprocess.STDOUT
        )


def wait_for(log: Path, text: str, process: subprocess.Popen, timeout: float = 300) -> None:
    """Waits until `text` appears in `log` (fails if the process ends first)."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if process.poll() is not None:
            pytest.fail(f"the process ended ({process.returncode}) before printing {text!r}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {text!r} after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture
def running(tmp_path):
    """A training run in a child process that has started its training loop; killed at the end if still alive."""
    log = tmp_path / "first.log"
    process = start("train", RUN + ["--output_dir", str(tmp_path / "run")], log)
    wait_for(log, "Training at learning rate", process)
    yield process, tmp_path / "run", log
    if process.poll() is None:
        process.kill()
        process.wait()


def test_a_second_run_on_the_folder_is_refused_and_a_killed_runs_lock_is_taken_over(running, tmp_path, caplog):
    first, output_dir, _ = running
    log = tmp_path / "second.log"
    second = start("train", RUN + ["--output_dir", str(output_dir), "--max_train_steps", "2"], log)
    assert second.wait(timeout=300) != 0
    assert f"is in use by another run (process {first.pid} on" in log.read_text()
    assert first.poll() is None  # the first run goes on
    # The Trainer script is refused the same way, before it loads anything.
    log = tmp_path / "trainer.log"
    trainer = start("run_object_detection", ["--output_dir", str(output_dir), "--max_steps", "2"], log)
    assert trainer.wait(timeout=300) != 0
    assert f"is in use by another run (process {first.pid} on" in log.read_text()

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    # The lock died with the process; its file still names it, and the next run takes it over.
    caplog.set_level(logging.WARNING)
    argv = RUN + ["--output_dir", str(output_dir), "--max_train_steps", "1"]
    assert load_example("train").main(argv) == 0
    assert f"Taking over {output_dir / LOCK_FILE_NAME} from process {first.pid}" in caplog.text
    assert (output_dir / "model.safetensors").is_file()
    assert (output_dir / LOCK_FILE_NAME).read_text() == ""  # released at the end


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_saves_a_checkpoint_says_how_to_resume_and_resumes(running, signum, status):
    process, output_dir, log = running
    time.sleep(1.0)  # a few steps
    process.send_signal(signum)
    assert process.wait(timeout=300) == status, log.read_text()[-3000:]
    text = log.read_text()
    assert "finishing the current step" in text and "--resume_from_checkpoint latest" in text
    complete, incomplete = list_checkpoints(output_dir)
    assert len(complete) == 1 and incomplete == []
    step = read_training_state(complete[0])["completed_steps"]
    assert step >= 1 and f"stopped after step {step}, saved in {complete[0]}" in text
    assert not (output_dir / "model.safetensors").exists()
    # The command, resumed, goes on from that step.
    argv = RUN + ["--output_dir", str(output_dir), "--max_train_steps", str(step + 1), "--resume_from_checkpoint", "latest"]
    assert load_example("train").main(argv) == 0
    assert json.loads((output_dir / "all_results.json").read_text())["train_steps"] == step + 1



def test_the_trainer_script_stops_on_sigint_with_a_checkpoint(tmp_path):
    output_dir, log = tmp_path / "run", tmp_path / "trainer.log"
    argv = [
        "--do_train", "--output_dir", str(output_dir), "--max_steps", "100000",
        "--synthetic_train_size", "8", "--validation_split", "none", "--image_size", "64",
        "--per_device_train_batch_size", "4", "--warmup_steps", "1", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "--seed", "3",
    ]  # fmt: skip
    process = start("run_object_detection", argv, log)
    try:
        wait_for(log, "/100000", process)  # the progress bar: training has begun
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=300) == 130, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    checkpoints = sorted(output_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    step = int(checkpoints[0].name.split("-")[1])
    assert step >= 1 and f"stopped after step {step}, saved in {checkpoints[0]}" in log.read_text()
    assert not (output_dir / "model.safetensors").exists()

def test_a_second_ctrl_c_quits_at_once_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    with StopOnSignal() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM and stop.should_stop() and stop.exit_code == 143
        os.kill(os.getpid(), signal.SIGTERM)  # already stopping: nothing more
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
    assert signal.getsignal(signal.SIGINT) is before


def test_the_lock_in_one_process(tmp_path):
    with OutputDirLock(tmp_path / "run") as lock:
        assert lock.path.read_text().split()[0] == str(os.getpid())
        # flock locks belong to an open file: a second one is refused in the same process too.
        with pytest.raises(OutputDirInUseError, match=f"process {os.getpid()} on"):
            OutputDirLock(tmp_path / "run").acquire()
    with OutputDirLock(tmp_path / "run"):
        pass
