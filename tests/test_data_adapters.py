"""Tests of the dataset adapters: HF datasets (CPPE-5 and xyxy styles), box format detection, COCO json folders."""

import io
import json
import logging
import re

import datasets
import numpy as np
import pytest
from PIL import Image

from pix2seq_hf.data.bbox_format import collect_bbox_evidence, detect_bbox_format
from pix2seq_hf.data.coco_json import load_coco_detection
from pix2seq_hf.data.hf_datasets import prepare_detection_dataset
from pix2seq_hf.data.schema import get_id2label
from pix2seq_hf.data.splits import load_detection_splits
from pix2seq_hf.training_options import DataOptions


W, H = 64, 48


def _image(width=W, height=H, value=0):
    return Image.new("RGB", (width, height), (value, value, value))


def _png_bytes(width=W, height=H):
    buffer = io.BytesIO()
    _image(width, height).save(buffer, format="PNG")
    return buffer.getvalue()


def cppe5_dataset(objects, names=("coverall", "mask", "gloves"), image_ids=None, images=None, with_size=True):
    """A CPPE-5 style dataset: `objects` is a list (per image) of lists of (bbox_xywh, category)."""
    n = len(objects)
    columns = {
        "image": images if images is not None else [_image() for _ in range(n)],
        "image_id": image_ids if image_ids is not None else list(range(100, 100 + n)),
        "objects": [
            {
                "id": [10 * i + j for j in range(len(objs))],
                "area": [float(b[2] * b[3]) for b, _ in objs],
                "bbox": [list(b) for b, _ in objs],
                "category": [c for _, c in objs],
            }
            for i, objs in enumerate(objects)
        ],
    }
    features = {
        "image": datasets.Image(),
        "image_id": datasets.Value("int64"),
        "objects": datasets.Sequence(
            {
                "id": datasets.Value("int64"),
                "area": datasets.Value("float32"),
                "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                "category": datasets.ClassLabel(names=list(names)),
            }
        ),
    }
    if with_size:
        columns["width"], columns["height"] = [W] * n, [H] * n
        features["width"], features["height"] = datasets.Value("int32"), datasets.Value("int32")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


# Boxes spread over the image: as xyxy several would have x2 < x1, so "auto" must say xywh.
CPPE5_OBJECTS = [
    [([30, 10, 8, 12], 0), ([5, 5, 20, 10], 2)],
    [([40, 20, 10, 10], 1)],
    [],
    [([50, 30, 6, 6], 0), ([2, 30, 12, 10], 1), ([20, 2, 4, 4], 2)],
]


# ------------------------------------------------------------------------------------------------------------------
# HF datasets
# ------------------------------------------------------------------------------------------------------------------


def test_cppe5_style_converts_to_common_format():
    split = prepare_detection_dataset(cppe5_dataset(CPPE5_OBJECTS), split_name="train")
    ds = split.dataset
    assert ds.column_names == ["image", "image_id", "width", "height", "objects"]
    assert split.id2label == {0: "coverall", 1: "mask", 2: "gloves"} == get_id2label(ds)
    assert split.label2category_id == {0: 0, 1: 1, 2: 2}
    assert ds["image_id"] == [100, 101, 102, 103]
    first = ds[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (W, H)
    assert first["objects"]["bbox"] == [[30, 10, 8, 12], [5, 5, 20, 10]]
    assert first["objects"]["category"] == [0, 2]
    assert first["objects"]["iscrowd"] == [0, 0]
    assert first["objects"]["id"] == [0, 1]
    # An image without objects is a valid example.
    assert ds[2]["objects"]["bbox"] == []
    assert split.stats.images == 4 and split.stats.objects == 6 and split.stats.images_without_objects == 1


def test_xyxy_list_of_dicts_with_label_key_and_no_size_columns():
    # detection-datasets style: objects as a list of dicts, xyxy boxes, "label" as plain ints, no width/height.
    rows = [
        [{"bbox": [2.0, 4.0, 40.0, 30.0], "label": 7}, {"bbox": [44.0, 20.0, 60.0, 46.0], "label": 3}],
        [{"bbox": [10.0, 10.0, 62.0, 40.0], "label": 7}],
    ]
    ds = datasets.Dataset.from_dict(
        {"image": [_image(), _image()], "image_id": [1, 2], "objects": rows},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "image_id": datasets.Value("int64"),
                "objects": datasets.List(
                    {"bbox": datasets.List(datasets.Value("float32")), "label": datasets.Value("int64")}
                ),
            }
        ),
    )
    split = prepare_detection_dataset(ds, bbox_format="auto")
    # Plain int categories 3 and 7 become labels 0 and 1, the map back is kept.
    assert split.id2label == {0: "3", 1: "7"}
    assert split.label2category_id == {0: 3, 1: 7}
    first = split.dataset[0]
    assert first["width"] == W and first["height"] == H  # read from the image header
    assert first["objects"]["bbox"] == [[2, 4, 38, 26], [44, 20, 16, 26]]
    assert first["objects"]["category"] == [1, 0]
    # The same data read as explicit xyxy, from an image column of another name, gives the same result.
    renamed = prepare_detection_dataset(ds.rename_column("image", "img"), bbox_format="xyxy", image_column="img")
    assert renamed.dataset.column_names == ["image", "image_id", "width", "height", "objects"]
    assert renamed.dataset[0]["objects"] == first["objects"]
    assert renamed.dataset[0]["image"].size == (W, H)


def test_given_id2label_maps_noncontiguous_ids_and_unknown_category_is_an_error():
    ds = datasets.Dataset.from_dict(
        {
            "image": [_image(), _image()],
            "image_id": [1, 2],
            "width": [W, W],
            "height": [H, H],
            "objects": [{"bbox": [[1, 1, 5, 5]], "category": [90]}, {"bbox": [[2, 2, 5, 5]], "category": [1]}],
        }
    )
    split = prepare_detection_dataset(ds, bbox_format="xywh", id2label={1: "person", 90: "toothbrush"})
    assert split.id2label == {0: "person", 1: "toothbrush"}
    assert split.label2category_id == {0: 1, 1: 90}
    assert split.dataset["objects"][0]["category"] == [1]
    with pytest.raises(ValueError, match=r"train\[1\] \(image_id 2\), object 0: category 1 is not in the label map"):
        prepare_detection_dataset(ds, bbox_format="xywh", id2label={90: "toothbrush"}, split_name="train")


def test_classlabel_missing_value_is_an_error_naming_the_record():
    ds = cppe5_dataset([[([1, 1, 5, 5], 0)], [([1, 1, 5, 5], -1)]])
    with pytest.raises(ValueError, match=r"val\[1\] \(image_id 101\), object 0: category -1 is not in the label map"):
        prepare_detection_dataset(ds, split_name="val")


def test_boxes_outside_zero_area_and_nonfinite_are_fixed_or_dropped_and_counted(caplog):
    objects = [
        [
            ([-5, -5, 20, 20], 0),  # partly outside: clipped to [0, 0, 15, 15]
            ([60, 40, 10, 10], 1),  # partly outside: clipped to [60, 40, 4, 8]
            ([70, 10, 5, 5], 1),  # entirely outside: dropped
            ([10, 10, 0, 5], 2),  # zero width: dropped
            ([10, 10, 5, -3], 2),  # negative height: dropped
            ([float("nan"), 1, 2, 2], 0),  # not finite: dropped
            ([30, 20, 4, 4], 2),  # fine
        ]
    ]
    with caplog.at_level(logging.WARNING):
        split = prepare_detection_dataset(cppe5_dataset(objects), bbox_format="xywh", split_name="train")
    assert split.dataset[0]["objects"]["bbox"] == [[0, 0, 15, 15], [60, 40, 4, 8], [30, 20, 4, 4]]
    assert split.dataset[0]["objects"]["category"] == [0, 1, 2]
    # The area of a clipped box shrinks with it.
    assert split.dataset[0]["objects"]["area"] == [225, 32, 16]
    stats = split.stats
    assert (stats.clipped_boxes, stats.dropped_outside_boxes, stats.dropped_empty_boxes) == (2, 1, 2)
    assert stats.dropped_nonfinite_boxes == 1 and stats.objects == 3
    warnings = [r.getMessage() for r in caplog.records if "Detection data 'train'" in r.getMessage()]
    assert len(warnings) == 1  # one summary, not one line per box
    assert "2 boxes partly outside" in warnings[0] and "1 boxes entirely outside" in warnings[0]


def test_image_left_without_objects_is_kept():
    split = prepare_detection_dataset(cppe5_dataset([[([100, 100, 5, 5], 0)]]), bbox_format="xywh")
    assert len(split.dataset) == 1 and split.dataset[0]["objects"]["bbox"] == []
    assert split.stats.images_without_objects == 1 and split.stats.dropped_outside_boxes == 1


def test_empty_split_is_an_error():
    with pytest.raises(ValueError, match="Dataset split 'validation' is empty"):
        prepare_detection_dataset(cppe5_dataset(CPPE5_OBJECTS).select([]), split_name="validation")


def test_missing_objects_column_is_an_error_listing_columns():
    ds = datasets.Dataset.from_dict({"image": [_image()], "annotations": [[1, 2, 3, 4]]}).cast_column(
        "image", datasets.Image()
    )
    with pytest.raises(ValueError, match=r"no objects column 'objects'; its columns are \['image', 'annotations'\]"):
        prepare_detection_dataset(ds)


def test_objects_without_box_field_is_an_error_listing_fields():
    ds = datasets.Dataset.from_dict({"image": [_image()], "objects": [{"xy": [[1, 2]], "category": [0]}]})
    ds = ds.cast_column("image", datasets.Image())
    with pytest.raises(ValueError, match=r"no box field.*found \['category', 'xy'\]"):
        prepare_detection_dataset(ds)


def test_corrupt_image_bytes_error_or_skip():
    images = [_image(), {"bytes": b"this is not an image", "path": None}, _image()]
    ds = cppe5_dataset([[([1, 1, 5, 5], 0)]] * 3, images=images)
    with pytest.raises(ValueError, match=r"train\[1\] \(image_id 101\): cannot read image in-memory image bytes"):
        prepare_detection_dataset(ds, check_images="decode", split_name="train")
    split = prepare_detection_dataset(ds, check_images="decode", on_bad_image="skip")
    assert split.dataset["image_id"] == [100, 102]
    assert split.stats.skipped_unreadable_images == 1 and split.stats.images == 2


def test_unreadable_image_found_when_size_must_be_read():
    images = [_image(), {"bytes": b"garbage", "path": None}]
    ds = cppe5_dataset([[([1, 1, 5, 5], 0)]] * 2, images=images, with_size=False)
    with pytest.raises(ValueError, match=r"\[1\] \(image_id 101\): cannot read image"):
        prepare_detection_dataset(ds, bbox_format="xywh")


def test_image_id_checks():
    ds = cppe5_dataset([[([1, 1, 5, 5], 0)]] * 2, image_ids=[7, 7])
    with pytest.raises(ValueError, match=r"repeats image ids: 7 \(2 times\)"):
        prepare_detection_dataset(ds)
    no_ids = cppe5_dataset([[([1, 1, 5, 5], 0)]] * 2).remove_columns("image_id")
    assert prepare_detection_dataset(no_ids).dataset["image_id"] == [0, 1]


def test_bad_arguments():
    ds = cppe5_dataset(CPPE5_OBJECTS)
    with pytest.raises(ValueError, match="`bbox_format` must be one of"):
        prepare_detection_dataset(ds, bbox_format="cxcywh")
    with pytest.raises(ValueError, match="`check_images` must be one of"):
        prepare_detection_dataset(ds, check_images="all")
    with pytest.raises(TypeError, match="pick a split"):
        prepare_detection_dataset(datasets.DatasetDict({"train": ds}))


# ------------------------------------------------------------------------------------------------------------------
# Box format detection
# ------------------------------------------------------------------------------------------------------------------


def test_detect_bbox_format_heuristic(caplog):
    sizes = [(100, 100)] * 3
    xywh_boxes = [[[50, 50, 10, 10]], [[5, 60, 30, 20]], [[70, 10, 20, 20]]]  # 50+10 fine as xywh; 10 < 50 -> not xyxy
    xyxy_boxes = [[[50, 50, 90, 90]], [[5, 60, 35, 80]], [[70, 10, 90, 30]]]  # 50+90 > 100 -> not xywh
    assert detect_bbox_format(collect_bbox_evidence(xywh_boxes, sizes)) == "xywh"
    assert detect_bbox_format(collect_bbox_evidence(xyxy_boxes, sizes)) == "xyxy"
    assert detect_bbox_format(collect_bbox_evidence([[]], [(10, 10)])) == "xywh"
    # Ambiguous: every box is valid both ways -> COCO's xywh with a warning.
    with caplog.at_level(logging.WARNING):
        assert detect_bbox_format(collect_bbox_evidence([[[2, 2, 20, 20]]], [(100, 100)])) == "xywh"
    assert any("Cannot tell the box format" in r.getMessage() for r in caplog.records)
    # Mostly xywh with a few sloppy boxes -> xywh without a warning.
    caplog.clear()
    sloppy = xywh_boxes * 10 + [[[95, 95, 20, 20]]]
    with caplog.at_level(logging.WARNING):
        assert detect_bbox_format(collect_bbox_evidence(sloppy, sizes * 10 + [(100, 100)])) == "xywh"
    assert not caplog.records
    with pytest.raises(ValueError, match="look normalised"):
        detect_bbox_format(collect_bbox_evidence([[[0.1, 0.2, 0.3, 0.4]]], [(100, 100)]))


# ------------------------------------------------------------------------------------------------------------------
# COCO json + image folder
# ------------------------------------------------------------------------------------------------------------------


def write_coco(tmp_path, images=3, extra_annotations=(), categories=None, corrupt=(), missing=()):
    """A COCO folder with `images` PNGs, non-contiguous category ids 1, 3, 7 and a crowd annotation."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    entries = []
    for index in range(images):
        image_id = 1000 + index
        name = f"{image_id:012d}.png"
        if image_id in corrupt:
            (folder / name).write_bytes(b"\x89PNG but truncated")
        elif image_id not in missing:
            _image(W, H, value=10 * index).save(folder / name)
        entries.append({"id": image_id, "file_name": name, "width": W, "height": H})
    annotations = [
        {"id": 1, "image_id": 1000, "bbox": [1, 2, 10, 20], "category_id": 7, "area": 150.0, "iscrowd": 0},
        {"id": 2, "image_id": 1000, "bbox": [20, 5, 30, 30], "category_id": 3, "area": 800.0, "iscrowd": 1},
        {"id": 3, "image_id": 1001, "bbox": [50, 40, 30, 30], "category_id": 1, "area": 900.0, "iscrowd": 0},
        *extra_annotations,
    ]
    categories = categories or [{"id": 7, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return path, folder


def test_coco_json_round_trip_with_noncontiguous_ids(tmp_path):
    annotation_file, folder = write_coco(tmp_path)
    split = load_coco_detection(annotation_file, folder, split_name="train")
    assert split.id2label == {0: "person", 1: "car", 2: "dog"}
    assert split.label2category_id == {0: 1, 1: 3, 2: 7}
    assert split.category_id2label == {1: 0, 3: 1, 7: 2}
    ds = split.dataset
    assert ds["image_id"] == [1000, 1001, 1002]
    # Images are stored by path and decoded lazily.
    raw = ds.cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert raw["bytes"] is None and raw["path"] == str((folder / "000000001000.png").resolve())
    first = ds[0]
    assert first["image"].size == (W, H) and first["image"].getpixel((0, 0)) == (0, 0, 0)
    assert first["objects"]["category"] == [2, 1]
    assert first["objects"]["iscrowd"] == [0, 1]  # crowd kept, flagged
    assert first["objects"]["id"] == [1, 2]
    assert first["objects"]["area"] == [150.0, 800.0]  # COCO's area is kept
    # The second image's box is clipped to the 64x48 image, its area too.
    assert ds[1]["objects"]["bbox"] == [[50, 40, 14, 8]] and ds[1]["objects"]["area"] == [112.0]
    assert ds[2]["objects"]["bbox"] == []
    assert split.stats.crowd_objects == 1 and split.stats.clipped_boxes == 1
    # Labels map back to the json's category ids.
    back = [split.label2category_id[label] for objs in ds["objects"] for label in objs["category"]]
    assert back == [7, 3, 1]


def test_coco_missing_image_error_and_skip(tmp_path):
    annotation_file, folder = write_coco(tmp_path, missing=(1001,))
    with pytest.raises(ValueError, match=r"image_id 1001 \(000000001001.png\): image file .* does not exist"):
        load_coco_detection(annotation_file, folder)
    split = load_coco_detection(annotation_file, folder, on_bad_image="skip")
    assert split.dataset["image_id"] == [1000, 1002]
    assert split.stats.skipped_missing_images == 1


def test_coco_corrupt_image_error_and_skip(tmp_path):
    annotation_file, folder = write_coco(tmp_path, corrupt=(1002,))
    # The default check only stats files; "decode" finds the corrupt one.
    assert len(load_coco_detection(annotation_file, folder).dataset) == 3
    with pytest.raises(ValueError, match=r"image_id 1002 \(000000001002.png\): cannot read image file"):
        load_coco_detection(annotation_file, folder, check_images="decode")
    split = load_coco_detection(annotation_file, folder, check_images="decode", on_bad_image="skip")
    assert split.dataset["image_id"] == [1000, 1001] and split.stats.skipped_unreadable_images == 1


def test_coco_unknown_category_and_image_are_errors(tmp_path):
    bad_category = ({"id": 9, "image_id": 1001, "bbox": [1, 1, 5, 5], "category_id": 5},)
    annotation_file, folder = write_coco(tmp_path, extra_annotations=bad_category)
    with pytest.raises(ValueError, match=r"annotation 9 \(image_id 1001\) has category_id 5, which is not in"):
        load_coco_detection(annotation_file, folder)
    bad_image = ({"id": 9, "image_id": 5, "bbox": [1, 1, 5, 5], "category_id": 1},)
    annotation_file, folder = write_coco(tmp_path, extra_annotations=bad_image)
    with pytest.raises(ValueError, match="annotation 9 refers to image_id 5, which is not in 'images'"):
        load_coco_detection(annotation_file, folder)



@pytest.mark.parametrize(
    "section, index, field, value, message",
    [
        ("categories", 1, "id", "x", r"categories\[1\]: id must be an integer, got 'x'"),
        ("categories", 0, "name", None, r"categories\[0\]: name must be a non-empty string, got None"),
        ("images", 1, "id", "7", r"images\[1\]: id must be an integer, got '7'"),
        ("images", 2, "width", "abc", r"images\[2\] \(image_id 1002\): width must be an integer, got 'abc'"),
        ("images", 0, "height", 0, r"images\[0\] \(image_id 1000\): height must be at least 1, got 0"),
        ("images", 0, "file_name", 12, r"images\[0\] \(image_id 1000\): file_name must be a non-empty string, got 12"),
        ("annotations", 2, "category_id", "1", r"annotation 3 \(image_id 1001\): category_id must be an integer, got '1'"),
        ("annotations", 0, "image_id", 1000.5, r"annotation 1: image_id must be an integer, got 1000.5"),
        ("annotations", 1, "bbox", [1, 2, "3", 4], r"annotation 2 \(image_id 1000\): bbox must be a number, got '3'"),
        ("annotations", 1, "bbox", [1, 2, 3], r"annotation 2 \(image_id 1000\): bbox must be a list of 4 numbers"),
        ("annotations", 0, "area", "big", r"annotation 1 \(image_id 1000\): area must be a number, got 'big'"),
        ("annotations", 0, "iscrowd", "no", r"annotation 1 \(image_id 1000\): iscrowd must be an integer, got 'no'"),
    ],
)
def test_coco_fields_of_the_wrong_type_are_named_with_file_record_and_value(tmp_path, section, index, field, value, message):
    annotation_file, folder = write_coco(tmp_path)
    data = json.loads(annotation_file.read_text())
    data[section][index][field] = value
    annotation_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(str(annotation_file)) + ": " + message):
        load_coco_detection(annotation_file, folder)


def test_coco_integral_floats_are_integers(tmp_path):
    annotation_file, folder = write_coco(tmp_path)
    data = json.loads(annotation_file.read_text())
    data["images"][0]["width"] = float(W)
    data["annotations"][0]["category_id"] = 7.0
    annotation_file.write_text(json.dumps(data))
    split = load_coco_detection(annotation_file, folder)
    assert split.dataset[0]["width"] == W and split.dataset[0]["objects"]["category"] == [2, 1]

def test_coco_empty_and_malformed_json(tmp_path):
    annotation_file, folder = write_coco(tmp_path, images=0, extra_annotations=())
    data = json.loads(annotation_file.read_text())
    data["annotations"] = []
    annotation_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'images' is empty"):
        load_coco_detection(annotation_file, folder)
    annotation_file.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"needs a list 'categories'; its keys are \['images'\]"):
        load_coco_detection(annotation_file, folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_coco_detection(tmp_path / "nope.json", folder)


# ------------------------------------------------------------------------------------------------------------------
# Splits of a run
# ------------------------------------------------------------------------------------------------------------------


def test_load_detection_splits_from_coco_json_shares_the_label_map(tmp_path):
    (tmp_path / "train").mkdir()
    train_file, train_folder = write_coco(tmp_path / "train")
    # The validation json lists its categories in another order and one more: labels follow the training split.
    categories = [
        {"id": 3, "name": "car"},
        {"id": 1, "name": "person"},
        {"id": 7, "name": "dog"},
        {"id": 9, "name": "cat"},
    ]
    (tmp_path / "val").mkdir()
    val_file, val_folder = write_coco(tmp_path / "val", images=2, categories=categories)
    splits = load_detection_splits(
        coco_annotations=str(train_file),
        coco_images=str(train_folder),
        validation_coco_annotations=str(val_file),
        validation_coco_images=str(val_folder),
    )
    assert splits.id2label == {0: "person", 1: "car", 2: "dog"}
    assert splits.validation[0]["objects"]["category"] == [2, 1]
    assert splits.stats["validation"]["crowd_objects"] == 1


def test_load_detection_splits_from_saved_hf_dataset(tmp_path):
    data = datasets.DatasetDict(
        {"train": cppe5_dataset(CPPE5_OBJECTS), "test": cppe5_dataset(CPPE5_OBJECTS[:2], image_ids=[1, 2])}
    )
    data.save_to_disk(tmp_path / "cppe5")
    with pytest.raises(ValueError, match=r"has no split 'validation'; its splits are \['train', 'test'\]"):
        load_detection_splits(dataset_name=str(tmp_path / "cppe5"))
    splits = load_detection_splits(
        DataOptions(dataset_name=str(tmp_path / "cppe5"), validation_split="test"), max_train_samples=3
    )
    assert len(splits.train) == 3 and len(splits.validation) == 2
    assert splits.id2label == {0: "coverall", 1: "mask", 2: "gloves"}
    assert splits.validation[0]["objects"]["category"] == [0, 2]
    none = load_detection_splits(dataset_name=str(tmp_path / "cppe5"), validation_split="none")
    assert none.validation is None
    with pytest.raises(TypeError, match="Unknown data options"):
        load_detection_splits(dataset="x")


def test_load_detection_splits_synthetic_default():
    splits = load_detection_splits(
        synthetic_train_size=6, synthetic_validation_size=3, synthetic_image_size=32, synthetic_max_objects=2, seed=1
    )
    assert all(1 <= len(objects["bbox"]) <= 2 for objects in splits.train["objects"])
    assert len(splits.train) == 6 and len(splits.validation) == 3
    assert splits.id2label == {0: "circle", 1: "square", 2: "triangle", 3: "cross", 4: "ring"}
    assert splits.source == "synthetic shapes"
    assert np.asarray(splits.train[0]["image"]).shape == (32, 32, 3)
