"""Streaming training data: each image read once per epoch by one reader, exact resume from a saved position (also
through examples/train.py), disjoint parts for 2 processes, local save_to_disk folders and parquet files."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest
import torch
from helpers import EXAMPLES, free_port, load_example
from PIL import Image
from safetensors.torch import load_file

from pix2seq_hf.data.schema import detection_features
from pix2seq_hf.data.streaming import (
    StreamingDataLoader,
    StreamingDetectionDataset,
    load_streaming_splits,
    open_stream,
)


def detection_dataset(num_images=24, seed=0, size=(32, 24)) -> datasets.Dataset:
    """A CPPE-5 style dataset of `num_images` small pictures (image ids 100, 101, ...) with 1 to 3 boxes each."""
    rng = np.random.default_rng(seed)
    rows = {"image": [], "image_id": [], "width": [], "height": [], "objects": []}
    for index in range(num_images):
        rows["image"].append(Image.new("RGB", size, (index * 9 % 255, 40, 90)))
        rows["image_id"].append(100 + index)
        rows["width"].append(size[0])
        rows["height"].append(size[1])
        count = int(rng.integers(1, 4))
        boxes = [[float(rng.integers(0, 12)), float(rng.integers(0, 8)), 9.0, 7.0] for _ in range(count)]
        rows["objects"].append(
            {
                "id": list(range(index * 10, index * 10 + count)),
                "area": [63.0] * count,
                "bbox": boxes,
                "category": [int(c) for c in rng.integers(0, 3, count)],
            }
        )
    features = detection_features(["red", "green", "blue"])
    del features["objects"]["iscrowd"]  # as in many Hub sets
    return datasets.Dataset.from_dict(rows, features=features)


def image_ids(examples):
    return {"image_ids": [example["image_id"] for example in examples]}


def read_batches(folder, workers, stop_after=None, state=None, epochs=2):
    """The image ids of each batch (with its epoch) of `epochs` epochs of the stream in `folder`, at batch 4, from
    `state` on; stopped after `stop_after` batches, with the loader's state then."""
    stream = StreamingDetectionDataset(open_stream(str(folder)), bbox_format="xywh", seed=3, shuffle_buffer_size=6)
    loader = StreamingDataLoader(stream, 4, image_ids, num_workers=workers)
    if state is not None:
        loader.load_state_dict(state)
    batches = []
    for epoch in range(stream.epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            batches.append((epoch, batch["image_ids"]))
            if len(batches) == stop_after:
                return batches, loader.state_dict()
    return batches, loader.state_dict()


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("streaming") / "data"
    splits = {"train": detection_dataset(), "validation": detection_dataset(6, seed=1)}
    datasets.DatasetDict(splits).save_to_disk(folder)
    return folder


@pytest.mark.parametrize("workers", [0, 2])
def test_each_image_is_read_once_per_epoch_and_a_resume_goes_on_exactly(saved_dataset, workers):
    uninterrupted, _ = read_batches(saved_dataset, workers)
    for epoch in (0, 1):
        seen = [image_id for batch_epoch, ids in uninterrupted if batch_epoch == epoch for image_id in ids]
        assert sorted(seen) == list(range(100, 124))
    # The epoch reshuffles the order.
    assert [ids for epoch, ids in uninterrupted if epoch == 0] != [ids for epoch, ids in uninterrupted if epoch == 1]
    # Stopped mid-epoch (with 2 workers: after a batch of the first worker, so the second one is next), at the end of
    # the epoch, and in the next one: the resumed loader gives exactly the batches the uninterrupted one gave.
    for stop_after in (3, 6, 7):
        first, state = read_batches(saved_dataset, workers, stop_after=stop_after)
        state = json.loads(json.dumps(state))  # as stored in a checkpoint
        rest, _ = read_batches(saved_dataset, workers, state=state)
        assert first + rest == uninterrupted, stop_after


def test_a_position_saved_with_other_workers_is_refused(saved_dataset):
    _, state = read_batches(saved_dataset, 2, stop_after=1)
    with pytest.raises(ValueError, match=r"saved with 2 reader\(s\) per process .* this run has 1"):
        read_batches(saved_dataset, 0, state=state)


def test_parquet_files_stream_in_the_common_format(tmp_path):
    data = detection_dataset(10)
    (tmp_path / "data").mkdir()
    data.select(range(5)).to_parquet(tmp_path / "data" / "train-00000-of-00002.parquet")
    data.select(range(5, 10)).to_parquet(tmp_path / "data" / "train-00001-of-00002.parquet")
    stream = StreamingDetectionDataset(open_stream(str(tmp_path / "data")), seed=0, shuffle_buffer_size=4)
    assert stream.id2label == {0: "red", 1: "green", 2: "blue"} and stream.bbox_format == "xywh"
    examples = {example["image_id"]: example for example in stream}
    assert sorted(examples) == list(range(100, 110))
    example, row = examples[104], data[4]
    assert example["objects"]["bbox"] == row["objects"]["bbox"]
    assert example["objects"]["category"] == row["objects"]["category"]
    assert example["image"]["bytes"] is not None and (example["width"], example["height"]) == (32, 24)


def test_a_single_saved_split_has_no_validation_split(tmp_path):
    folder = tmp_path / "single"
    detection_dataset(4).save_to_disk(folder)
    with pytest.raises(ValueError, match=r"holds a single split \(read as 'train'\); it has no split 'validation'"):
        load_streaming_splits(str(folder), validation_split="validation")
    train, validation = load_streaming_splits(str(folder), validation_split="none")
    assert validation is None and train.id2label


def test_a_stream_without_class_names_is_refused(tmp_path):
    data = detection_dataset(4)
    data = data.cast_column("objects", {**data.features["objects"], "category": datasets.List(datasets.Value("int64"))})
    data.save_to_disk(tmp_path / "data")
    with pytest.raises(ValueError, match=r"objects.category is not a ClassLabel.*Give `id2label`"):
        StreamingDetectionDataset(open_stream(str(tmp_path / "data")))


READER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from pix2seq_hf.data.streaming import StreamingDataLoader, StreamingDetectionDataset, open_stream

    def image_ids(examples):
        return {"image_ids": [example["image_id"] for example in examples]}

    accelerator = Accelerator(cpu=True)
    stream = StreamingDetectionDataset(
        open_stream(sys.argv[1]), bbox_format="xywh", rank=accelerator.process_index,
        world_size=accelerator.num_processes, seed=3, shuffle_buffer_size=6,
    )
    loader = StreamingDataLoader(stream, 4, image_ids, num_workers=2)
    batches = iter(loader)
    read = list(next(batches)["image_ids"])
    state = loader.state_dict()  # gathered from both processes
    read += [image_id for batch in batches for image_id in batch["image_ids"]]
    everything = gather_object([read])
    if accelerator.is_main_process:
        output = {"backend": str(accelerator.state.backend), "read": everything, "state": state}
        json.dump(output, open(sys.argv[2], "w"))
    # Workers and the process group ended before the interpreter exits (gloo's threads abort otherwise).
    del batches
    accelerator.wait_for_everyone()
    accelerator.end_training()
    """
)


def test_two_processes_read_disjoint_parts(saved_dataset, tmp_path):
    script = tmp_path / "read_stream.py"
    script.write_text(READER_SCRIPT)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(script), str(saved_dataset), str(tmp_path / "read.json"),
    ]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(EXAMPLES.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    output = json.loads((tmp_path / "read.json").read_text())
    assert output["backend"] == "gloo"
    first, second = output["read"]
    assert len(first) == len(second) == 12
    assert not set(first) & set(second)
    assert sorted(first + second) == list(range(100, 124))
    # The position saved after the first batch, one per process.
    assert output["state"] == {"positions": [{"epoch": 0, "consumed": [4, 0], "next_reader": 1}] * 2}


STREAMING_RUN = [
    "--streaming",
    "--validation_split", "none",
    "--image_size", "64",
    "--per_device_train_batch_size", "3",
    "--dataloader_num_workers", "2",
    "--num_warmup_steps", "1",
    "--seed", "5",
    "--learning_rate", "0.001",
    "--num_threads", "1",
    "--max_train_steps", "6",
    "--checkpointing_steps", "3",
    "--num_visualizations", "0",
]  # fmt: skip


def test_streaming_training_resumes_to_the_uninterrupted_weights(tmp_path):
    """10 images, 2 workers of 5, batch 3: an epoch is 4 batches (3, 3, 2, 2); the checkpoint at step 3 is mid-epoch
    with the second worker next, and the resumed run crosses into the next epoch."""
    train = load_example("train")
    folder = tmp_path / "data"
    datasets.DatasetDict({"train": detection_dataset(10, size=(64, 48))}).save_to_disk(folder)
    run = STREAMING_RUN + ["--dataset_name", str(folder)]
    reference = tmp_path / "reference"
    assert train.main(run + ["--output_dir", str(reference)]) == 0
    state = torch.load(reference / "step_3" / "custom_checkpoint_0.pkl", weights_only=False)
    assert state == {"positions": [{"epoch": 0, "consumed": [5, 3], "next_reader": 1}]}

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(reference / "step_3", resumed / "step_3")
    assert train.main(run + ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"]) == 0
    expected, got = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    # Without the position (the stream restarted), the same resume trains other weights.
    restarted = tmp_path / "restarted"
    restarted.mkdir()
    shutil.copytree(reference / "step_3", restarted / "step_3")
    start = {"positions": [{"epoch": 0, "consumed": [0, 0], "next_reader": 0}]}
    torch.save(start, restarted / "step_3" / "custom_checkpoint_0.pkl")
    assert train.main(run + ["--output_dir", str(restarted), "--resume_from_checkpoint", "latest"]) == 0
    other = load_file(restarted / "model.safetensors")
    assert any(not torch.allclose(other[name], tensor, rtol=1e-5, atol=1e-6) for name, tensor in expected.items())


def test_streaming_needs_a_budget_and_a_dataset(capsys):
    train = load_example("train")
    with pytest.raises(SystemExit):
        train.parse_args(["--streaming", "--dataset_name", "somewhere"])
    assert "streaming needs max_train_steps or max_train_minutes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--streaming", "--max_train_steps", "5"])
    assert "streaming reads dataset_name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--streaming", "--dataset_name", "somewhere", "--max_train_steps", "5", "--max_train_samples", "9"])
    assert "max_train_samples reads the head of a split" in capsys.readouterr().err
    args = train.parse_args(["--streaming", "--dataset_name", "somewhere", "--max_train_minutes", "3"])
    assert args.streaming
