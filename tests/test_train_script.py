"""End-to-end tests of examples/train.py, examples/detect.py and examples/evaluate.py on tiny synthetic data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import free_port, load_example

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY_RUN = [
    "--synthetic_train_size", "24",
    "--synthetic_validation_size", "6",
    "--image_size", "64",
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "6",
    "--num_warmup_steps", "1",
    "--num_visualizations", "2",
    "--seed", "3",
    "--num_threads", "1",
    "--sequences_per_image", "2",  # the runs also check that two sequences per image train, resume and save
]  # fmt: skip


@pytest.fixture(scope="module")
def train_module():
    return load_example("train")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_module):
    """4 steps with a checkpoint every 2 and an evaluation at step 2."""
    output_dir = tmp_path_factory.mktemp("run") / "model"
    argv = TINY_RUN + ["--max_train_steps", "4", "--checkpointing_steps", "2", "--eval_steps", "2"]
    assert train_module.main(argv + ["--output_dir", str(output_dir)]) == 0
    return output_dir


def test_training_writes_a_loadable_model_metrics_and_pictures(trained):
    import pix2seq_hf  # noqa: F401
    from transformers import AutoModelForObjectDetection, AutoProcessor

    from pix2seq_hf import training_setup

    results = json.loads((trained / "all_results.json").read_text())
    for key in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100"):
        assert isinstance(results[key], float)
    assert results["train_steps"] == 4 and results["world_size"] == 1
    # Nothing chose a precision: bf16 autocast on a CPU with AMX, float32 elsewhere; the weights stay float32.
    on_cpu = not torch.accelerator.is_available()
    assert results["mixed_precision"] == training_setup.default_mixed_precision(on_cpu)
    weights = load_file(trained / "model.safetensors").values()
    assert {tensor.dtype for tensor in weights if tensor.is_floating_point()} == {torch.float32}
    assert [entry["step"] for entry in results["history"]] == [2, 4]
    assert all(entry["loss"] > 0 for entry in results["history"])
    assert len(results["visualizations"]) == 2 and all(Path(p).is_file() for p in results["visualizations"])
    assert (trained / "model.safetensors").is_file() and (trained / "step_2").is_dir() and (trained / "step_4").is_dir()

    model = AutoModelForObjectDetection.from_pretrained(trained)
    processor = AutoProcessor.from_pretrained(trained)
    processor.check_model_compatible(model)
    assert model.config.id2label[0] == "circle"
    assert model.config.use_pretrained_backbone is False


def test_resume_is_exact(trained, train_module, tmp_path):
    """Stopping after 2 steps (the step_2 checkpoint) and resuming for 2 more equals 4 uninterrupted steps."""
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(trained / "step_2", resumed / "step_2")
    argv = TINY_RUN + ["--max_train_steps", "4", "--num_visualizations", "0"]
    assert train_module.main(argv + ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"]) == 0

    uninterrupted = load_file(trained / "step_4" / "model.safetensors")
    after_resume = load_file(resumed / "model.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(after_resume[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # Resuming from step 2 must have changed the weights (the test could not fail otherwise).
    at_step_2 = load_file(trained / "step_2" / "model.safetensors")
    assert any(not torch.equal(at_step_2[name], tensor) for name, tensor in uninterrupted.items())
    assert json.loads((resumed / "all_results.json").read_text())["train_steps"] == 4


def test_resume_without_checkpoint_names_the_folder(train_module, tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete step_N checkpoint"):
        train_module.main(TINY_RUN + ["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])


def test_optimizer_slows_the_transformer_encoder_only(train_module):
    import argparse

    from pix2seq_hf import Pix2SeqForObjectDetection
    from helpers import tiny_config

    model = Pix2SeqForObjectDetection(tiny_config(auxiliary_loss_weight=1.0))
    args = argparse.Namespace(
        learning_rate=1e-3, encoder_lr_scale=0.1, weight_decay=0.05, adam_beta1=0.9, adam_beta2=0.95
    )
    optimizer = train_module.build_optimizer(model, args, torch.device("cpu"))
    assert optimizer.defaults["fused"]
    setting = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            setting[id(parameter)] = (group["lr"], group["weight_decay"])
    named = dict(model.named_parameters())
    assert len(setting) == len(named)
    assert setting[id(named["model.encoder.input_projection.weight"])] == (pytest.approx(1e-4), 0.05)
    assert setting[id(named["model.encoder.layers.0.self_attn_layer_norm.weight"])] == (pytest.approx(1e-4), 0.0)
    assert setting[id(named["model.encoder.bridge.projection.weight"])] == (pytest.approx(1e-4), 0.05)
    backbone_conv = next(name for name in named if name.startswith("model.encoder.backbone.") and "conv" in name)
    assert setting[id(named[backbone_conv])] == (1e-3, 0.05)
    assert setting[id(named["model.decoder.layers.0.encoder_attn.k_proj.weight"])] == (1e-3, 0.05)
    assert setting[id(named["model.decoder.layers.0.encoder_attn.k_proj.bias"])] == (1e-3, 0.0)
    # The auxiliary head sits in the encoder but learns at the full rate.
    assert setting[id(named["model.encoder.auxiliary_head.box_head.weight"])] == (1e-3, 0.05)


def test_detect_script_writes_json_and_pictures(trained, tmp_path):
    from PIL import Image

    detect = load_example("detect")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (90, 60), (10, 200, 30)).save(images / "green.png")
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert detect.main([str(images), "--model", str(trained), "--output_dir", str(out), "--threshold", "0"]) == 0
    report = json.loads((out / "detections.json").read_text())
    assert report["skipped"] == [str(images / "broken.png")]
    (entry,) = report["images"]
    assert (entry["width"], entry["height"]) == (90, 60)
    for detection in entry["detections"]:
        x0, y0, x1, y1 = detection["box"]
        assert 0 <= x0 <= x1 <= 90 and 0 <= y0 <= y1 <= 60
    assert (out / "green.png").is_file()


def test_evaluate_script_reports_coco_metrics(trained, tmp_path):
    evaluate_script = load_example("evaluate")
    output = tmp_path / "metrics.json"
    argv = ["--model", str(trained), "--synthetic_validation_size", "6", "--output_file", str(output), "--batch_size", "6"]
    assert evaluate_script.main(argv) == 0
    report = json.loads(output.read_text())
    assert set(report["metrics"]) >= {"map", "map_50", "mar_100"}
    assert report["num_images"] == 6 and isinstance(report["predictions"], list)


def test_two_processes_train_together(tmp_path):
    """torchrun starts two CPU processes that Accelerate joins over gloo (world size 2 in the log and results)."""
    output_dir = tmp_path / "two"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(EXAMPLES / "train.py"), *TINY_RUN, "--max_train_steps", "2", "--output_dir", str(output_dir),
        "--num_visualizations", "0",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "MULTI_CPU, world size 2, process 0" in log and "MULTI_CPU, world size 2, process 1" in log
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["world_size"] == 2 and results["train_steps"] == 2
    assert isinstance(results["map"], float)


def test_training_log_to_a_file_has_lines_not_progress_bars(tmp_path):
    """Output redirected to a file (not a terminal): no progress-bar redraws, a loss line every `--logging_steps`."""
    log_file = tmp_path / "train.log"
    command = [
        sys.executable, str(EXAMPLES / "train.py"), *TINY_RUN, "--max_train_steps", "4", "--logging_steps", "2",
        "--num_visualizations", "0", "--output_dir", str(tmp_path / "model"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log_file, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=600)
    log = log_file.read_text()
    assert result.returncode == 0, log[-3000:]
    assert "\r" not in log and "it/s]" not in log and "█" not in log
    assert "step 2/4: loss " in log and "step 4/4: loss " in log and "step 1/4" not in log
