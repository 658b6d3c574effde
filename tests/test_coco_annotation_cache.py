"""The COCO json split: vectorised checks and cleaning equal to the per-image rules, and the memory-mapped cache
shared by processes and runs."""

import json
import math
import multiprocessing
import os
import tracemalloc

import datasets
import numpy as np
import pytest
from helpers import load_example
from PIL import Image

from pix2seq_hf.data import annotation_cache, coco_json, json_stream
from pix2seq_hf.data.coco_json import load_coco_detection
from pix2seq_hf.data.schema import clean_objects


def write_messy_coco(tmp_path, num_images=30, seed=0):
    """A json with every case the cleaning handles: clipped, outside, empty and non-finite boxes, missing ids, areas
    and crowd flags, integral floats, images without a size (read from their file) and images without objects."""
    rng = np.random.default_rng(seed)
    folder = tmp_path / "images"
    folder.mkdir()
    images, annotations = [], []
    for index in range(num_images):
        width, height = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        entry = {"id": 500 - 7 * index, "file_name": f"{index}.png"}
        Image.new("RGB", (width, height)).save(folder / entry["file_name"])
        if index % 5:
            entry.update(width=width, height=height)
        images.append(entry)
    for position in range(8 * num_images):
        image = images[int(rng.integers(0, num_images - 3))]
        box = (rng.uniform(-20, 70, size=4) * [1, 1, 0.6, 0.6]).round(1).tolist()
        if position % 11 == 0:
            box[2] = -box[2]
        if position % 13 == 0:
            box[0] = float("nan")
        annotation = {"image_id": image["id"], "bbox": box, "category_id": int(rng.choice([3, 9, 4]))}
        if position % 3:
            annotation["id"] = 10_000 + position
        if position % 4:
            annotation["area"] = float(rng.uniform(-5, 900))
        if position % 7 == 0:
            annotation["iscrowd"] = [0, 1, 2, None][position % 4]
        if position % 9 == 0:
            annotation["category_id"] = float(annotation["category_id"])
        annotations.append(annotation)
    categories = [{"id": 9, "name": "nine"}, {"id": 3, "name": "three"}, {"id": 4, "name": "four"}]
    path = tmp_path / "messy.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, folder


def test_coco_split_matches_the_per_image_cleaning(tmp_path):
    path, folder = write_messy_coco(tmp_path)
    split = load_coco_detection(path, folder, check_images="exists", cache_dir=tmp_path / "cache")
    data = json.loads(path.read_text())
    category_to_label = {3: 0, 4: 1, 9: 2}
    assert split.label2category_id == {0: 3, 1: 4, 2: 9}
    total = {}
    assert split.dataset["image_id"] == [image["id"] for image in data["images"]]
    for image, row in zip(data["images"], split.dataset.cast_column("image", datasets.Image(decode=False))):
        width, height = image.get("width"), image.get("height")
        if width is None:
            width, height = Image.open(folder / image["file_name"]).size
        assert (row["width"], row["height"]) == (width, height)
        assert row["image"] == {"bytes": None, "path": str(folder / image["file_name"])}
        mine = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        objects, counts = clean_objects(
            [a["bbox"] for a in mine],
            [int(a["category_id"]) for a in mine],
            width,
            height,
            "xywh",
            category_to_label.__getitem__,
            str(image["id"]),
            ids=[a.get("id", image["id"] * 1000 + i) for i, a in enumerate(mine)],
            areas=[a.get("area") for a in mine],
            iscrowd=[a.get("iscrowd") or 0 for a in mine],
        )
        for name, value in counts.items():
            total[name] = total.get(name, 0) + value
        got = row["objects"]
        assert got["id"] == objects["id"]
        assert got["category"] == objects["category"]
        assert got["iscrowd"] == objects["iscrowd"]
        np.testing.assert_allclose(np.array(got["bbox"]).reshape(-1, 4), np.array(objects["bbox"]).reshape(-1, 4), rtol=1e-6)
        np.testing.assert_allclose(got["area"], objects["area"], rtol=1e-6)
    assert split.stats.to_dict() == total
    assert total["dropped_nonfinite_boxes"] and total["dropped_empty_boxes"] and total["dropped_outside_boxes"]
    assert total["clipped_boxes"] and total["crowd_objects"] and total["images_without_objects"] >= 3


def test_coco_split_is_built_once_and_then_mapped(tmp_path, monkeypatch):
    path, folder = write_messy_coco(tmp_path)
    cache = tmp_path / "cache"
    first = load_coco_detection(path, folder, check_images="none", cache_dir=cache)

    def no_parse(*args):
        raise AssertionError("the json was parsed again")

    monkeypatch.setattr(coco_json, "_read_json", no_parse)
    again = load_coco_detection(path, folder, check_images="none", cache_dir=cache)
    assert again.dataset.data.table.equals(first.dataset.data.table)
    assert again.stats == first.stats and again.id2label == first.id2label
    (cached_file,) = [entry["filename"] for entry in again.dataset.cache_files]
    assert cached_file.startswith(str(cache))
    # Another label map, or another json content, is another entry (and needs a parse).
    with pytest.raises(AssertionError, match="parsed again"):
        load_coco_detection(path, folder, check_images="none", cache_dir=cache, label2category_id={0: 9, 1: 3, 2: 4})
    data = json.loads(path.read_text())
    data["annotations"][0]["bbox"][2] += 1
    path.write_text(json.dumps(data))
    with pytest.raises(AssertionError, match="parsed again"):
        load_coco_detection(path, folder, check_images="none", cache_dir=cache)


def test_coco_split_with_an_error_leaves_no_cache_entry(tmp_path):
    path, folder = write_messy_coco(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"][40]["bbox"] = [1, 2, "3", 4]
    path.write_text(json.dumps(data))
    name = data["annotations"][40].get("id", "#40")
    with pytest.raises(ValueError, match=rf"annotation {name} \(image_id -?\d+\): bbox must be a number, got '3'"):
        load_coco_detection(path, folder, check_images="none", cache_dir=tmp_path / "cache")
    assert [entry for entry in os.listdir(tmp_path / "cache") if not entry.endswith(".lock")] == []


def test_coco_unknown_image_is_named_at_its_first_annotation(tmp_path):
    path, folder = write_messy_coco(tmp_path)
    data = json.loads(path.read_text())
    for position in (50, 20):
        data["annotations"][position].update(id=90_000 + position, image_id=12345)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotation 90020 refers to image_id 12345, which is not in 'images'"):
        load_coco_detection(path, folder, check_images="none", cache_dir=tmp_path / "cache")


def _load_in_process(path, folder, cache, queue):
    split = load_coco_detection(path, folder, check_images="none", cache_dir=cache)
    queue.put((len(split.dataset), split.dataset.cache_files[0]["filename"], math.fsum(split.dataset["width"])))


def test_coco_split_is_shared_by_concurrent_processes(tmp_path):
    path, folder = write_messy_coco(tmp_path, num_images=200)
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_load_in_process, args=(path, folder, cache, queue)) for _ in range(2)]
    for process in processes:
        process.start()
    results = [queue.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert results[0] == results[1]
    assert [entry for entry in os.listdir(cache) if not entry.endswith(".lock")] == [os.path.basename(os.path.dirname(results[0][1]))]


def test_data_loading_benchmark_smoke(tmp_path, capsys):
    benchmark = load_example("benchmarks/benchmark_data_loading")
    annotation_file = tmp_path / "generated.json"
    num_boxes = benchmark.write_objects365_like_json(str(annotation_file), 50)
    data = json.loads(annotation_file.read_text())
    assert len(data["images"]) == 50 and len(data["annotations"]) == num_boxes > 300
    assert len(data["categories"]) == 365
    split = load_coco_detection(annotation_file, tmp_path, check_images="none", cache_dir=tmp_path / "cache")
    assert split.stats.objects == num_boxes and split.stats.clipped_boxes == 0

    argv = ["--num_images", "40", "--processes", "1", "2", "--first_processes", "1"]
    results = benchmark.main(argv + ["--output_file", str(tmp_path / "r.json")])
    assert [(run["images"], run["processes"]) for run in results["runs"]] == [(40, 1), (40, 2)]
    one, two = results["runs"]
    assert len(one["first_peak_rss_mib"]) == len(one["cached_peak_rss_mib"]) == 1
    assert two["first_peak_rss_mib"] is None and len(two["cached_peak_rss_mib"]) == 2  # cached only
    for run in results["runs"]:
        assert run["cached_startup_s"] >= 0 and run["boxes"] > 0
    assert json.loads((tmp_path / "r.json").read_text()) == results
    assert "cached s" in capsys.readouterr().out


def _table_and_stats(split):
    return split.dataset.data.table, split.stats, split.id2label


def test_coco_split_is_the_same_whatever_the_key_order_whitespace_and_escapes(tmp_path):
    path, folder = write_messy_coco(tmp_path)
    data = json.loads(path.read_text())
    data["categories"][0]["name"] = 'nine "ñandú" \\ ü'
    Image.new("RGB", (30, 20)).save(folder / "é ü.png")
    data["images"][3]["file_name"] = "é ü.png"
    data["images"][3].update(width=30, height=20)
    path.write_text(json.dumps(data))
    expected = _table_and_stats(load_coco_detection(path, folder, check_images="exists", cache_dir=tmp_path / "a"))
    assert expected[2][2] == 'nine "ñandú" \\ ü'

    # Categories first, then annotations, then images and an extra member; indented, every non-ASCII character and
    # every key escaped, numbers written with exponents.
    reordered = {"categories": data["categories"], "annotations": data["annotations"], "images": data["images"]}
    reordered["info"] = {"description": "keys in another order", "years": [2017, 2026]}
    text = json.dumps(reordered, indent="\t\n ", ensure_ascii=True)
    text = text.replace('"images"', '"\\u0069mages"').replace('"width": 30', '"width": 3.0e1')
    other = tmp_path / "reordered.json"
    other.write_text(text)
    assert json.loads(text) == reordered
    got = _table_and_stats(load_coco_detection(other, folder, check_images="exists", cache_dir=tmp_path / "b"))
    assert got[0].equals(expected[0]) and got[1:] == expected[1:]


def test_coco_split_is_the_same_read_in_small_chunks(tmp_path, monkeypatch):
    path, folder = write_messy_coco(tmp_path, num_images=40)
    expected = _table_and_stats(load_coco_detection(path, folder, check_images="none", cache_dir=tmp_path / "a"))
    monkeypatch.setattr(coco_json, "_RECORDS_PER_CHUNK", 7)
    monkeypatch.setattr(coco_json, "_IMAGES_PER_BATCH", 3)
    monkeypatch.setattr(json_stream, "_READ_CHARS", 50)
    got = _table_and_stats(load_coco_detection(path, folder, check_images="none", cache_dir=tmp_path / "b"))
    assert got[0].equals(expected[0]) and got[1:] == expected[1:]
    assert got[0].to_batches()[0].num_rows == 3  # written a few images at a time


@pytest.mark.parametrize("images_last", [False, True])
def test_coco_split_names_the_first_bad_record_across_chunks(tmp_path, monkeypatch, images_last):
    monkeypatch.setattr(coco_json, "_RECORDS_PER_CHUNK", 7)
    path, folder = write_messy_coco(tmp_path)
    data = json.loads(path.read_text())
    if images_last:
        data = {"annotations": data["annotations"], "categories": data["categories"], "images": data["images"]}

    def load_error(annotations):
        path.write_text(json.dumps({**data, "annotations": annotations}))
        with pytest.raises(ValueError) as error:
            load_coco_detection(path, folder, check_images="none", cache_dir=tmp_path / "cache")
        return str(error.value)

    # An unknown image (found once every image is known) before a field of the wrong type, and the other way round.
    annotations = [dict(annotation, id=70_000 + position) for position, annotation in enumerate(data["annotations"])]
    annotations[12]["image_id"] = 999_999
    annotations[30]["bbox"] = [1, 2, "3", 4]
    assert "annotation 70012 refers to image_id 999999, which is not in 'images'" in load_error(annotations)
    annotations[12]["image_id"], annotations[30]["image_id"] = annotations[30]["image_id"], 999_999
    annotations[12]["bbox"], annotations[30]["bbox"] = annotations[30]["bbox"], annotations[12]["bbox"]
    assert "annotation 70012 (image_id " in load_error(annotations)
    assert "bbox must be a number, got '3'" in load_error(annotations)
    # A bad category record is named before a bad image record, whichever comes first in the file.
    images = [dict(image) for image in data["images"]]
    images[20]["file_name"] = ""
    data["images"] = images
    assert "images[20]" in load_error(annotations)
    data["categories"] = [*data["categories"], {"id": "ten", "name": "ten"}]
    assert "categories[3]: id must be an integer, got 'ten'" in load_error(annotations)


def test_coco_split_reports_invalid_json_where_json_load_does(tmp_path):
    path, folder = write_messy_coco(tmp_path)
    text = json.dumps(json.loads(path.read_text()), indent=1)
    for broken in (text[: len(text) // 2], text.replace("]", "", 1), text + " {}", '{"images": [}'):
        path.write_text(broken)
        with pytest.raises(json.JSONDecodeError) as expected:
            json.loads(broken)
        with pytest.raises(ValueError, match="is not valid JSON") as error:
            load_coco_detection(path, folder, check_images="none", cache_dir=tmp_path / "cache")
        assert str(error.value).endswith(f"is not valid JSON: {expected.value}")
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"must hold a JSON object, got list"):
        load_coco_detection(path, folder, check_images="none", cache_dir=tmp_path / "cache")
    path.write_text('{"images": {}, "categories": []}')
    with pytest.raises(ValueError, match=r"needs a list 'images'; its keys are \['categories', 'images'\]"):
        load_coco_detection(path, folder, check_images="none", cache_dir=tmp_path / "cache")


def test_coco_split_is_built_in_bounded_memory(tmp_path, monkeypatch):
    """Building holds the columns and a chunk of the file and its records, not the parsed json: a fraction of what
    `json.load` takes (chunks made small here, so that a small json shows it)."""
    benchmark = load_example("benchmarks/benchmark_data_loading")
    annotation_file = tmp_path / "generated.json"
    benchmark.write_objects365_like_json(str(annotation_file), 2000)
    tracemalloc.start()
    with open(annotation_file) as handle:
        json.load(handle)
    parse_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    monkeypatch.setattr(coco_json, "_RECORDS_PER_CHUNK", 1000)
    monkeypatch.setattr(json_stream, "_READ_CHARS", 2**16)
    monkeypatch.setattr(annotation_cache, "_HASH_CHUNK_BYTES", 2**16)
    split = load_coco_detection(annotation_file, tmp_path, check_images="none", cache_dir=tmp_path / "cache")
    build_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert split.stats.images == 2000 and split.stats.objects > 25_000
    assert build_peak < parse_peak / 3, (build_peak, parse_peak)
