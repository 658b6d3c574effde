"""Data parallelism through Accelerate: 2 CPU processes (gloo) with half the batch each make the same updates as one
process with the whole batch."""

import json
import os
import subprocess
import sys

import torch
from helpers import EXAMPLES, free_port
from PIL import Image, ImageDraw
from safetensors.torch import load_file


# A deterministic run: every image has 3 objects (so every sequence has as many tokens), no image or sequence
# augmentation, no dropout, and BatchNorm with fixed statistics (per-process batch statistics would differ).
RUN = [
    "--image_size", "64",
    "--augmentation", "none",
    "--no_sequence_augmentation",
    "--object_order", "area",
    "--config_overrides", '{"backbone_kwargs": {"out_indices": [3], "freeze_batch_norm_2d": true}}',
    "--learning_rate", "1e-4",
    "--num_warmup_steps", "0",
    "--max_train_steps", "3",
    "--validation_split", "none",
    "--num_visualizations", "0",
    "--mixed_precision", "no",
    "--seed", "5",
    "--num_threads", "1",
]  # fmt: skip


def write_coco(folder, num_images=16, seed=0):
    """A COCO json of `num_images` 64 px pictures with 3 coloured boxes each, and its image folder."""
    generator = torch.Generator().manual_seed(seed)
    images, annotations = [], []
    (folder / "images").mkdir(parents=True)
    for index in range(num_images):
        picture = Image.new("RGB", (64, 64), (20, 20, 20))
        draw = ImageDraw.Draw(picture)
        for k in range(3):
            x, y = (int(v) for v in torch.randint(0, 40, (2,), generator=generator))
            w, h = (int(v) for v in torch.randint(8, 24, (2,), generator=generator))
            category = k % 2 + 1
            draw.rectangle([x, y, x + w, y + h], fill=(200, 40, 40) if category == 1 else (40, 40, 200))
            annotations.append(
                {"id": len(annotations) + 1, "image_id": index, "bbox": [x, y, w, h], "category_id": category}
            )
        picture.save(folder / "images" / f"{index}.png")
        images.append({"id": index, "file_name": f"{index}.png", "width": 64, "height": 64})
    categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]
    (folder / "train.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ["--coco_annotations", str(folder / "train.json"), "--coco_images", str(folder / "images")]


def train(output_dir, data: list[str], processes: int, batch: int) -> dict[str, torch.Tensor]:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port())]
    command = [*launcher, str(EXAMPLES / "train.py"), *data, *RUN, "--per_device_train_batch_size", str(batch)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        command + ["--output_dir", str(output_dir)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return load_file(output_dir / "model.safetensors")


def difference(first: dict, second: dict) -> float:
    """The norm of the difference of all weights."""
    assert first.keys() == second.keys()
    return sum((first[name].double() - second[name].double()).square().sum().item() for name in first) ** 0.5


def test_two_processes_with_half_the_batch_train_the_same_weights(tmp_path):
    data = write_coco(tmp_path / "data")
    one = train(tmp_path / "one", data, processes=1, batch=4)
    two = train(tmp_path / "two", data, processes=2, batch=2)
    # Another global batch (2 x 4 images) is another run: the equivalence is not a matter of tolerance.
    other = train(tmp_path / "other", data, processes=2, batch=4)
    same, different = difference(one, two), difference(one, other)
    # What remains is float rounding (gradients summed in another order), which Adam's normalisation enlarges for
    # weights whose gradients are near zero: at most about the learning rate per step.
    assert max((one[name] - two[name]).abs().max().item() for name in one) < 3 * 1e-4
    assert same < 0.1 * different, (same, different)
