"""Publishing to the Hub (a local stand-in): examples/train.py --push_to_hub, the model card, remote code."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from huggingface_hub import ModelCard

from helpers import load_example
from hub_stand_in import LocalHub


TINY_RUN = [
    "--synthetic_train_size", "8",
    "--synthetic_validation_size", "4",
    "--image_size", "64",
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "4",
    "--num_warmup_steps", "1",
    "--num_visualizations", "0",
    "--seed", "3",
    "--num_threads", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """examples/train.py, 2 steps with a checkpoint and an upload at each, pushed at the end."""
    from transformers.utils import hub

    train = load_example("train")
    root = tmp_path_factory.mktemp("hub_run")
    local_hub = LocalHub(root / "hub")
    argv = TINY_RUN + [
        "--output_dir", str(root / "out"), "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--push_to_hub", "--hub_model_id", "me/pix2seq-tiny", "--hub_strategy", "every_save",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub, "_hf_api", local_hub)
        assert train.main(argv) == 0
    return root / "hub" / "me" / "pix2seq-tiny", local_hub


def test_train_script_pushes_checkpoints_then_the_final_model_with_code_and_card(pushed):
    folder, local_hub = pushed
    assert [message for _, message in local_hub.commits] == [
        "Training in progress, step 1",
        "Training in progress, step 2",
        "End of training",
    ]
    assert not any(folder.glob("step_*")) and not (folder / "logs").exists()
    for name in ("model.safetensors", "config.json", "generation_config.json", "processor_config.json"):
        assert (folder / name).is_file(), name
    assert (folder / "modeling_pix2seq.py").is_file() and (folder / "processing_pix2seq.py").is_file()
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForObjectDetection"] == "modeling_pix2seq.Pix2SeqForObjectDetection"
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "object-detection" and card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0"
    assert "| mAP |" in card.text and "synthetic shapes" in card.text and "`max_train_steps` | `2`" in card.text
    assert 'pipeline("object-detection", model="me/pix2seq-tiny", trust_remote_code=True)' in card.text
    # Pushing did not leave the classes registered for remote code.
    from pix2seq_hf import Pix2SeqConfig

    assert Pix2SeqConfig._auto_class is None


def test_pushed_model_loads_with_remote_code_where_pix2seq_hf_is_missing(pushed, tmp_path):
    folder, _ = pushed
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["pix2seq_hf"] = None  # importing pix2seq_hf now fails
        from PIL import Image
        from transformers import AutoModelForObjectDetection, AutoProcessor, pipeline
        path = {str(folder)!r}
        model = AutoModelForObjectDetection.from_pretrained(path, trust_remote_code=True)
        assert "pix2seq_hf" not in type(model).__module__, type(model).__module__
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        image = Image.new("RGB", (80, 48), (200, 10, 10))
        outputs = model.generate(processor(images=image, return_tensors="pt").pixel_values, do_sample=False)
        found = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(48, 80)])[0]
        detections = pipeline("object-detection", model=path, trust_remote_code=True)(image, threshold=0.0)
        print("OK", type(model).__name__, len(found["scores"]), len(detections))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK Pix2SeqForObjectDetection" in result.stdout


def test_model_card_metadata_for_a_hub_dataset_and_base_model(tmp_path):
    from helpers import tiny_config
    from pix2seq_hf import Pix2SeqForObjectDetection
    from pix2seq_hf.hub import write_model_card

    model = Pix2SeqForObjectDetection(tiny_config(id2label={i: f"c{i}" for i in range(5)}))
    card = write_model_card(
        tmp_path,
        model=model,
        metrics={"eval_map": 0.25, "eval_map_50": 0.5, "eval_loss": 3.0},
        dataset="cppe-5",
        base_model="someone/pix2seq-r50",
        training_arguments={"learning_rate": 3e-5, "seed": 1, "push_to_hub": True},
        license="mit",
        repo_id="me/pix2seq-cppe5",
    )
    reloaded = ModelCard.load(tmp_path / "README.md")
    assert reloaded.data.license == "mit" and reloaded.data.base_model == "someone/pix2seq-r50"
    assert reloaded.data.datasets == ["cppe-5"]
    (result,) = [r for r in reloaded.data.eval_results if r.metric_type == "mAP"]
    assert result.metric_value == pytest.approx(0.25) and result.task_type == "object-detection"
    assert "| mAP | 0.2500 |" in card.text and "| mAP@0.50 | 0.5000 |" in card.text and "eval_loss" not in card.text
    assert "`learning_rate` | `3e-05`" in card.text and "push_to_hub" not in card.text
    assert "Fine-tuned from `someone/pix2seq-r50`" in card.text and "`c0`, `c1`" in card.text
