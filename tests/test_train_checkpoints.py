"""
examples/train.py loses nothing: saves killed at any point resume to the weights of an uninterrupted run, resuming at or
past the last step finishes cleanly, output folders of other runs are refused, and bad images are named or skipped.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import EXAMPLES, load_example
from pix2seq_hf.checkpointing import find_checkpoint, list_checkpoints, write_files_atomically


# 24 images at batch 4: 6 steps an epoch; no validation split, to keep each run to seconds.
RUN = [
    "--synthetic_train_size", "24",
    "--validation_split", "none",
    "--image_size", "64",
    "--per_device_train_batch_size", "4",
    "--num_warmup_steps", "1",
    "--seed", "5",
    "--learning_rate", "0.001",
    "--num_threads", "1",
    "--max_train_steps", "4",
    "--checkpointing_steps", "2",
]  # fmt: skip
# Points of the save of step_4 where a training process is killed: just after the folder appears, after every file of
# Accelerate's state (before the completeness marker), after the rename (before the older checkpoint is pruned).
KILL_POINTS = ("started", "state_written", "renamed")
KILL_LAUNCHER = Path(__file__).resolve().parent / "kill_during_checkpoint.py"


@pytest.fixture(scope="module")
def train_module():
    return load_example("train")


def _start_training(argv: list[str], kill_at: str, log: Path) -> subprocess.Popen:
    """
    Starts `examples/train.py argv` in a new Python process that `kill_during_checkpoint.py` SIGKILLs at `kill_at`
    (`<step>:<point>`), its output in `log`, and returns it. A new interpreter rather than a fork of pytest: a forked
    child cannot run autograd once its parent has.
    """
    package_root = str(EXAMPLES.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = [sys.executable, str(KILL_LAUNCHER), kill_at, str(EXAMPLES / "train.py"), *argv]
    with open(log, "w") as output:
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def killed_processes(tmp_path_factory):
    """The run in child processes that are SIGKILLed at each of `KILL_POINTS` (running while `reference` trains)."""
    root = tmp_path_factory.mktemp("killed")
    processes = {
        point: _start_training(
            RUN + ["--output_dir", str(root / point)], f"4:{point}", root / f"{point}.log"
        )
        for point in KILL_POINTS
    }
    yield root, processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_module):
    """4 uninterrupted steps, a checkpoint every 2, keeping 1."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    assert train_module.main(RUN + ["--output_dir", str(output_dir), "--checkpoints_total_limit", "1"]) == 0
    return output_dir


def _rewrite_training_state(checkpoint: Path, edit) -> None:
    """Rewrites `checkpoint`'s training_state.json with `edit(state)` (which changes the dict in place)."""
    state_file = checkpoint / "training_state.json"
    state = json.loads(state_file.read_text())
    edit(state)
    state_file.write_text(json.dumps(state))


def _assert_same_weights(path_a: Path, path_b: Path) -> None:
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_killed_saves_resume_to_the_uninterrupted_weights(killed_processes, reference, train_module, caplog):
    root, processes = killed_processes
    for point, process in processes.items():
        returncode = process.wait(timeout=600)
        log = (root / f"{point}.log").read_text()[-3000:]
        assert returncode == -signal.SIGKILL, f"{point}: exit status {returncode}\n{log}"

    for point in KILL_POINTS:
        output_dir = root / point
        complete, incomplete = list_checkpoints(output_dir)
        assert not (output_dir / "model.safetensors").exists()
        if point == "renamed":
            # Killed after the rename, before the older checkpoint was pruned: step_4 is complete.
            assert [path.name for path in complete] == ["step_2", "step_4"] and incomplete == [], point
        else:
            assert [path.name for path in complete] == ["step_2"], point
            assert [path.name for path in incomplete] == ["step_4.partial"], point

        caplog.clear()
        with caplog.at_level(logging.INFO):
            argv = RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"]
            assert train_module.main(argv) == 0
        if point == "renamed":
            # At the last step: nothing more is trained (not one step more), the model is saved.
            assert "nothing left to train" in caplog.text
        else:
            assert "Skipping" in caplog.text and "step_4.partial" in caplog.text, point
            assert f"Resumed from {output_dir / 'step_2'} at step 2" in caplog.text, point
        _assert_same_weights(reference / "model.safetensors", output_dir / "model.safetensors")
        assert json.loads((output_dir / "all_results.json").read_text())["train_steps"] == 4
        # The interrupted save left nothing behind once the run saved again.
        assert not list(output_dir.glob("*.partial")), point


def test_a_weight_average_is_what_is_saved_and_it_resumes(train_module, tmp_path, capsys):
    # --ema_decay 0.5 over 4 steps: the saved model is 0.5^(4 - t) w_t summed (w_1 weighing 0.5^3), the trained weights
    # w_t being those of each step's checkpoint; a run resumed from step 2 saves the same average.
    argv = RUN + ["--ema_decay", "0.5", "--checkpointing_steps", "1"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert train_module.main(argv + ["--output_dir", str(full)]) == 0
    saved = load_file(full / "model.safetensors")
    trained = [load_file(full / f"step_{step}" / "model.safetensors") for step in range(1, 5)]
    weights = (0.125, 0.125, 0.25, 0.5)
    for name, tensor in saved.items():
        if tensor.is_floating_point():
            expected = sum(weight * step[name] for weight, step in zip(weights, trained))
            torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(saved[name], trained[-1][name]) for name in saved)
    resumed.mkdir()
    shutil.copytree(full / "step_2", resumed / "step_2")
    assert train_module.main(argv + ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"]) == 0
    _assert_same_weights(full / "model.safetensors", resumed / "model.safetensors")
    with pytest.raises(SystemExit):
        train_module.parse_args(["--ema_decay", "1"])
    assert "ema_decay must be in (0, 1), got 1.0" in capsys.readouterr().err


def test_resuming_with_a_weight_average_the_checkpoint_lacks_is_refused_by_name(train_module, tmp_path):
    # A checkpoint of a run without --ema_decay, its recorded arguments from before the option existed (no
    # `ema_decay`): resuming with --ema_decay names the missing state instead of failing inside Accelerate.
    output_dir = tmp_path / "run"
    argv = RUN + ["--max_train_steps", "2", "--output_dir", str(output_dir)]
    assert train_module.main(argv) == 0
    _rewrite_training_state(output_dir / "step_2", lambda state: state["run"].pop("ema_decay"))
    resume = argv + ["--resume_from_checkpoint", "latest", "--ema_decay", "0.9", "--max_train_steps", "3"]
    with pytest.raises(ValueError, match=r"step_2 holds no saved state of the weight average \(--ema_decay\)"):
        train_module.main(resume)
    # With the recorded arguments the run's own check names the difference first.
    _rewrite_training_state(output_dir / "step_2", lambda state: state["run"].update(ema_decay=None))
    with pytest.raises(ValueError, match=r"ema_decay=None \(now 0.9\)"):
        train_module.main(resume)


def test_checkpoints_total_limit_keeps_the_newest(reference):
    complete, incomplete = list_checkpoints(reference)
    assert [path.name for path in complete] == ["step_4"] and incomplete == []
    assert not list(reference.glob("*.partial"))
    state = json.loads((reference / "step_4" / "training_state.json").read_text())
    assert state["completed_steps"] == 4 and state["run"]["seed"] == 5
    assert state["elapsed_seconds"] > 0


def test_a_time_limit_counts_the_time_before_the_resume(train_module, tmp_path):
    # A checkpoint that has already spent the whole time limit: the resumed run trains one step and stops there.
    output_dir = tmp_path / "run"
    argv = RUN + ["--max_train_minutes", "30", "--output_dir", str(output_dir)]
    assert train_module.main(argv) == 0
    _rewrite_training_state(output_dir / "step_2", lambda state: state.update(elapsed_seconds=30 * 60.0))
    shutil.rmtree(output_dir / "step_4")
    assert train_module.main(argv + ["--resume_from_checkpoint", "latest"]) == 0
    assert json.loads((output_dir / "all_results.json").read_text())["train_steps"] == 3


def test_resuming_past_the_last_step_saves_that_checkpoint_and_trains_no_more(reference, train_module, tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    shutil.copytree(reference / "step_4", output_dir / "step_4")
    argv = RUN[:-4] + ["--max_train_steps", "3", "--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"]
    assert train_module.main(argv) == 0
    _assert_same_weights(reference / "step_4" / "model.safetensors", output_dir / "model.safetensors")
    assert json.loads((output_dir / "all_results.json").read_text())["train_steps"] == 4


def test_latest_skips_an_incomplete_step_folder_and_an_explicit_one_is_refused(reference, tmp_path, caplog):
    shutil.copytree(reference / "step_4", tmp_path / "step_4")
    shutil.copytree(reference / "step_4", tmp_path / "step_6")
    (tmp_path / "step_6" / "training_state.json").unlink()
    # A save killed after its marker, before the rename: still a `.partial` folder, never resumed.
    shutil.copytree(reference / "step_4", tmp_path / "step_8.partial")
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(tmp_path, "latest") == tmp_path / "step_4"
    assert "Skipping" in caplog.text and "step_6" in caplog.text and "step_8.partial" in caplog.text
    with pytest.raises(FileNotFoundError, match="step_6 is not a complete checkpoint"):
        find_checkpoint(tmp_path, tmp_path / "step_6")


def test_an_output_dir_of_another_run_is_refused(reference, train_module, tmp_path):
    # A finished run's folder, and fine-tuning a model in place.
    with pytest.raises(FileExistsError, match=r"already holds a model or checkpoints of another run \(config.json"):
        train_module.main(RUN + ["--output_dir", str(reference)])
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        train_module.main(RUN + ["--model_name_or_path", str(reference), "--output_dir", str(reference)])
    # Checkpoints alone count too.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(reference / "step_4", other / "step_4")
    with pytest.raises(FileExistsError, match=r"step_4"):
        train_module.main(RUN + ["--output_dir", str(other)])
    # Resuming a checkpoint written with other arguments names them.
    with pytest.raises(ValueError, match=r"belongs to another run: .*learning_rate=0.001 \(now 0.01\)"):
        argv = RUN + ["--output_dir", str(other), "--resume_from_checkpoint", "latest", "--learning_rate", "0.01"]
        train_module.main(argv)


def test_overwrite_output_dir_fine_tunes_in_place_and_drops_the_old_checkpoints(reference, train_module, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(reference, folder)
    before = load_file(folder / "model.safetensors")
    argv = RUN[:-4] + ["--max_train_steps", "1", "--model_name_or_path", str(folder), "--output_dir", str(folder)]
    assert train_module.main(argv + ["--overwrite_output_dir"]) == 0
    assert list_checkpoints(folder) == ([], [])
    after = load_file(folder / "model.safetensors")
    assert any(not torch.equal(after[name], tensor) for name, tensor in before.items())
    assert json.loads((folder / "all_results.json").read_text())["train_steps"] == 1
    assert not list(folder.glob(".*partial"))


def _coco_set(folder: Path, truncated: int) -> tuple[Path, Path]:
    """4 noisy 32x32 images with one box each; image `truncated` is cut to half its bytes (its header is intact)."""
    images = folder / "images"
    images.mkdir(parents=True)
    records, annotations = [], []
    for index in range(4):
        path = images / f"img{index}.jpg"
        pixels = np.random.default_rng(index).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=95)
        if index == truncated:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        records.append({"id": 10 + index, "file_name": path.name, "width": 32, "height": 32})
        annotations.append({"id": index, "image_id": 10 + index, "bbox": [4, 4, 16, 16], "category_id": 1})
    ann = folder / "train.json"
    categories = [{"id": 1, "name": "box"}]
    ann.write_text(json.dumps({"images": records, "annotations": annotations, "categories": categories}))
    return ann, images


def test_a_bad_image_met_mid_run_is_named_or_skipped(train_module, tmp_path):
    ann, images = _coco_set(tmp_path / "data", truncated=2)
    argv = [
        "--coco_annotations", str(ann), "--coco_images", str(images), "--image_size", "32",
        "--per_device_train_batch_size", "2", "--max_train_steps", "2", "--num_warmup_steps", "1",
        "--num_threads", "1", "--num_visualizations", "0",
    ]  # fmt: skip
    # The default check ("exists") passes: the file is there; reading it fails while training.
    with pytest.raises(ValueError, match=r"image_id 12: cannot read image file '.*img2.jpg'.*on_bad_image='skip'"):
        train_module.main(argv + ["--output_dir", str(tmp_path / "error")])
    assert train_module.main(argv + ["--output_dir", str(tmp_path / "skip"), "--on_bad_image", "skip"]) == 0
    results = json.loads((tmp_path / "skip" / "all_results.json").read_text())
    assert results["skipped_bad_images"] == 1 and results["train_steps"] == 2
    # The evaluation script: the same choice, the skipped image left out of the metrics and counted.
    evaluate = load_example("evaluate")
    eval_argv = [
        "--model", str(tmp_path / "skip"), "--validation_coco_annotations", str(ann),
        "--validation_coco_images", str(images), "--output_file", str(tmp_path / "eval.json"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"image_id 12: cannot read image file '.*img2.jpg'"):
        evaluate.main(eval_argv)
    assert evaluate.main(eval_argv + ["--on_bad_image", "skip"]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["skipped_bad_images"] == 1 and report["num_images"] == 3
    # Checked up front instead: training does not start.
    with pytest.raises(ValueError, match=r"image_id 12 \(img2.jpg\): cannot read image"):
        train_module.main(argv + ["--output_dir", str(tmp_path / "check"), "--check_images", "decode"])


def test_a_final_save_that_fails_midway_leaves_the_earlier_model_whole(tmp_path):
    (tmp_path / "config.json").write_text('{"old": true}')
    (tmp_path / "model.safetensors").write_bytes(b"old weights")

    def write_half(folder: Path) -> None:
        (folder / "config.json").write_text('{"new": true}')
        (folder / "model.safetensors").write_bytes(b"new wei")
        raise KeyboardInterrupt  # killed while writing the weights

    with pytest.raises(KeyboardInterrupt):
        write_files_atomically(tmp_path, write_half)
    assert (tmp_path / "config.json").read_text() == '{"old": true}'
    assert (tmp_path / "model.safetensors").read_bytes() == b"old weights"

    def write_all(folder: Path) -> None:
        (folder / "config.json").write_text('{"new": true}')
        (folder / "model.safetensors").write_bytes(b"new weights")

    written = write_files_atomically(tmp_path, write_all)
    assert sorted(path.name for path in written) == ["config.json", "model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == b"new weights"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--checkpointing_steps", "ten"],
        ["--checkpointing_steps", "0"],
        ["--checkpoints_total_limit", "0"],
        ["--overwrite_output_dir", "--resume_from_checkpoint", "latest"],
        ["--on_bad_image", "ignore"],
    ],
)
def test_checkpoint_and_output_options_are_checked(train_module, argv, capsys):
    with pytest.raises(SystemExit):
        train_module.parse_args(argv)
    assert argv[0].lstrip("-") in capsys.readouterr().err
