"""End-to-end tests of examples/run_object_detection.py (the Trainer script) on a tiny synthetic set, pushing to a
local stand-in of the Hub."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import load_example
from hub_stand_in import LocalHub


TINY_RUN = [
    "--do_train", "--do_eval",
    "--synthetic_train_size", "8",
    "--synthetic_validation_size", "4",
    "--image_size", "64",
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "4",
    "--warmup_steps", "1",
    "--learning_rate", "1e-3",
    "--eval_strategy", "steps", "--eval_steps", "1",
    "--save_strategy", "steps", "--save_steps", "1",
    "--report_to", "none",
    "--use_cpu",
    "--seed", "3",
    "--disable_tqdm", "true",
    "--sequences_per_image", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def script():
    return load_example("run_object_detection")


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory, script):
    """2 steps, evaluated and saved at each, the best model loaded at the end, pushed with every save."""
    from transformers.utils import hub

    root = tmp_path_factory.mktemp("trainer")
    local_hub = LocalHub(root / "hub")
    argv = TINY_RUN + [
        "--output_dir", str(root / "out"),
        "--max_steps", "2",
        "--load_best_model_at_end",
        "--early_stopping_patience", "3",
        "--push_to_hub", "--hub_model_id", "me/pix2seq-trainer", "--hub_strategy", "checkpoint",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub, "_hf_api", local_hub)
        assert script.main(argv) == 0
    return root / "out", root / "hub" / "me" / "pix2seq-trainer"


def test_trainer_evaluates_with_coco_metrics_and_keeps_the_best_model(pushed_run):
    output_dir, _ = pushed_run
    state = json.loads((output_dir / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_map" in entry]
    assert [entry["step"] for entry in evaluations][:2] == [1, 2]
    for key in ("eval_map", "eval_map_50", "eval_map_75", "eval_mar_100", "eval_loss"):
        assert isinstance(evaluations[0][key], float)
    assert state["best_metric"] == max(entry["eval_map"] for entry in evaluations[:2])
    assert Path(state["best_model_checkpoint"]).name in {"checkpoint-1", "checkpoint-2"}
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["eval_map"] == pytest.approx(state["best_metric"])
    # Pushing registered the classes for remote code only for the run.
    from pix2seq_hf import Pix2SeqForObjectDetection

    assert Pix2SeqForObjectDetection._auto_class is None


def test_pushed_copy_has_code_card_and_last_checkpoint(pushed_run):
    import pix2seq_hf  # noqa: F401
    from transformers import AutoModelForObjectDetection, AutoProcessor

    _, pushed = pushed_run
    config = json.loads((pushed / "config.json").read_text())
    assert config["auto_map"]["AutoModelForObjectDetection"] == "modeling_pix2seq.Pix2SeqForObjectDetection"
    assert (pushed / "modeling_pix2seq.py").is_file() and (pushed / "configuration_pix2seq.py").is_file()
    assert (pushed / "processor_config.json").is_file() and (pushed / "model.safetensors").is_file()
    assert not any(pushed.glob("checkpoint-*"))
    assert (pushed / "last-checkpoint" / "model.safetensors").is_file()
    # The whole processor (token layout and codec), not only the image processor, goes with every checkpoint.
    assert (pushed / "last-checkpoint" / "processor_config.json").is_file()
    card = (pushed / "README.md").read_text()
    assert "pipeline_tag: object-detection" in card and "license: apache-2.0" in card
    assert "| mAP |" in card and "synthetic shapes" in card and "`learning_rate` | `0.001`" in card
    assert 'pipeline("object-detection", model="me/pix2seq-trainer", trust_remote_code=True)' in card
    model = AutoModelForObjectDetection.from_pretrained(pushed)
    AutoProcessor.from_pretrained(pushed).check_model_compatible(model)


def test_training_resumes_from_the_last_checkpoint(pushed_run, script, tmp_path, caplog):
    output_dir, _ = pushed_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(output_dir / "checkpoint-1", resumed / "checkpoint-1")
    with caplog.at_level("INFO"):
        assert script.main(TINY_RUN + ["--output_dir", str(resumed), "--max_steps", "2"]) == 0
    assert "Resuming from" in caplog.text and "checkpoint-1" in caplog.text
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # The log of step 1 comes from the checkpoint: the run did not start over.
    assert [entry["step"] for entry in state["log_history"] if "eval_map" in entry][:2] == [1, 2]
    assert (resumed / "README.md").is_file()


def test_coco_metric_scores_batches_as_they_come(script):
    """Perfect detections score mAP 1 and wrong ones 0, over two batches; an image repeated by padding counts once."""
    from transformers import EvalPrediction

    metric = script.CocoMetric({0: "a", 1: "b"})

    def batch(image_ids, label_shift):
        truths, found = [], []
        for image_id in image_ids:
            boxes = torch.tensor([[10.0, 10.0, 30.0, 40.0], [50.0, 5.0, 70.0, 25.0]])
            labels = torch.tensor([0.0, 1.0])
            header = torch.tensor([[image_id, 80, 100, 0, script.PAD, 0, 0]])
            objects = torch.cat([boxes, labels[:, None], torch.zeros(2, 1), (20 * 30.0) * torch.ones(2, 1)], dim=1)
            truths.append(torch.cat([header, objects]))
            found.append(torch.cat([boxes, torch.full((2, 1), 0.9), ((labels + label_shift) % 2)[:, None]], dim=1))
        return EvalPrediction(predictions=script.pack_rows(found, 6), label_ids=script.pack_rows(truths, 7))

    assert metric(batch([1, 2], 0), compute_result=False) is None
    assert metric(batch([3, 3], 0), compute_result=True)["map"] == pytest.approx(1.0)
    assert len(metric.evaluator) == 0  # starts afresh for the next evaluation
    assert metric(batch([1, 2], 1), compute_result=True)["map"] == pytest.approx(0.0)


def test_without_warmup_steps_the_trainer_takes_the_planned_warmup(script, tmp_path):
    """40 steps and no --warmup_steps: 2 steps of warm-up (5% of the steps), so the rate peaks within the first 10%."""
    argv = [
        "--do_train", "--synthetic_train_size", "8", "--validation_split", "none", "--image_size", "64",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--max_steps", "40", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--seed", "3", "--disable_tqdm", "true",
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    assert script.main(argv) == 0
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    rates = {entry["step"]: entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry}
    peak = max(rates.values())
    assert rates[1] < peak and min(step for step, rate in rates.items() if rate == peak) <= 4


def test_do_train_false_only_evaluates(script, tmp_path):
    argv = [
        "--do_train", "false", "--synthetic_validation_size", "4", "--image_size", "64", "--report_to", "none",
        "--use_cpu", "--disable_tqdm", "true", "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    assert script.main(argv) == 0
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert "eval_map" in metrics and not (tmp_path / "out" / "train_results.json").exists()


def test_a_resumed_time_budget_counts_the_minutes_before_the_resume(script):
    """The `Trainer` loads the scheduler state (its elapsed time) before `on_train_begin`: the clock goes on from it."""
    import time

    from pix2seq_hf.training_plan import plan_training
    from pix2seq_hf.training_setup import LinearDecayToBudget

    plan = plan_training(100, per_device_batch_size=4, max_train_minutes=10.0)
    budget = script.TimeBudget(plan)
    budget.schedule = LinearDecayToBudget.for_plan(plan)
    budget.schedule.set_elapsed(300.0)  # as restored from a checkpoint
    budget.on_train_begin(None, None, None)
    budget.on_step_begin(None, None, None)
    assert 300.0 <= budget.schedule.elapsed_seconds < 330.0
    assert abs((time.time() - budget.start) - budget.schedule.elapsed_seconds) < 30.0


def test_max_train_minutes_ends_the_trainer_run_and_its_linear_decay(script, tmp_path):
    """As in examples/train.py: the run stops after the step in which the minutes ran out, the rate decayed to 0."""
    argv = [
        "--synthetic_train_size", "8", "--validation_split", "none", "--image_size", "64",
        "--per_device_train_batch_size", "4", "--max_train_steps", "50", "--max_train_minutes", "0.0001",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--seed", "3",
        "--disable_tqdm", "true", "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    assert script.main(argv) == 0
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert rates == [0.0]
