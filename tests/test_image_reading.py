"""The one image reader of the loaders, the collator and the scripts: EXIF orientation, sizes in the frame an image is
shown in, decompression bombs, and PIL modes without an RGB conversion."""

import json
import struct
import zlib

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import load_example, tiny_config
from PIL import Image

from pix2seq_hf import Pix2SeqForObjectDetection, Pix2SeqImageProcessor, Pix2SeqProcessor
from pix2seq_hf.data import ImageReadError, Pix2SeqCollator, decode_image, load_coco_detection, undecoded_images
from pix2seq_hf.data.images import image_size, set_max_image_pixels, to_rgb


def save_rotated_jpeg(path, width=40, height=20):
    """A `width x height` JPEG (left half red, right half blue) whose EXIF says: show it turned 90 degrees clockwise."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())


def save_bomb_png(path, width=20000, height=20000):
    """A tiny PNG whose header claims `width x height` pixels (a decompression bomb to Pillow)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture
def default_pixel_limit():
    limit = PIL.Image.MAX_IMAGE_PIXELS
    yield limit
    PIL.Image.MAX_IMAGE_PIXELS = limit


def test_exif_orientation_is_applied_and_sizes_are_read_in_the_shown_frame(tmp_path):
    path = tmp_path / "phone.jpg"
    save_rotated_jpeg(path)
    image = decode_image(str(path), "record")
    assert image.size == (20, 40) and image_size(str(path), "record") == (20, 40)
    # Turned clockwise: the red left half is now on top.
    pixels = np.asarray(image)
    assert pixels[5, 10, 0] > 200 and pixels[35, 10, 2] > 200

    # A COCO json without sizes: the sizes of the shown image, so the collator finds no mismatch.
    (tmp_path / "images").mkdir()
    path.rename(tmp_path / "images" / "phone.jpg")
    annotations = {
        "images": [{"id": 1, "file_name": "phone.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [2, 25, 10, 10], "category_id": 1}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    split = load_coco_detection(tmp_path / "ann.json", tmp_path / "images")
    example = split.dataset[0]
    assert (example["width"], example["height"]) == (20, 40)
    assert example["objects"]["bbox"] == [[2, 25, 10, 10]]  # not clipped to the stored 40 x 20
    processor = Pix2SeqProcessor.from_config(tiny_config(), image_processor=Pix2SeqImageProcessor(size=64))
    collator = Pix2SeqCollator(processor, training=False, on_size_mismatch="error")
    batch = collator([undecoded_images(split.dataset)[0]])
    assert batch["targets"][0]["orig_size"].tolist() == [40, 20] and collator.stats["size_mismatches"] == 0


def test_a_decompression_bomb_is_an_unreadable_image_and_the_limit_can_be_raised(tmp_path, default_pixel_limit):
    bomb = tmp_path / "bomb.png"
    save_bomb_png(bomb)
    with pytest.raises(ImageReadError, match=r"image_id 3: cannot read image file .*bomb.png.*decompression bomb"):
        decode_image(str(bomb), "image_id 3")
    with pytest.raises(ImageReadError, match="decompression bomb"):
        image_size(str(bomb), "image_id 3")
    set_max_image_pixels(0)  # no limit: the header is read (the pixel data is another matter)
    assert image_size(str(bomb), "image_id 3") == (20000, 20000)
    with pytest.raises(ValueError, match="must be positive"):
        set_max_image_pixels(-1)


def test_modes_without_an_rgb_conversion_are_converted_or_refused_by_record(tmp_path):
    la = Image.fromarray(np.stack([np.full((8, 8), 100, np.uint8), np.full((8, 8), 255, np.uint8)], -1), "LA")
    assert np.asarray(to_rgb(la.convert("La"), "r")).tolist() == np.asarray(to_rgb(la, "r")).tolist()
    assert to_rgb(Image.fromarray(np.full((4, 4), 40000, np.uint16)), "r").getpixel((0, 0)) == (156, 156, 156)
    with pytest.raises(ImageReadError, match="image_id 4: PIL images of mode 'LAB' are not supported"):
        to_rgb(Image.new("LAB", (4, 4)), "image_id 4")

    # The training collator (augmentation on) reads an "La" image instead of failing inside Pillow, and skips a
    # "LAB" one when told to.
    from pix2seq_hf.data import build_train_transforms

    processor = Pix2SeqProcessor.from_config(tiny_config(), image_processor=Pix2SeqImageProcessor(size=64))
    objects = {"bbox": [[1, 1, 4, 4]], "category": [0], "iscrowd": [0], "area": [16.0]}
    examples = [
        {"image": la.convert("La"), "image_id": 1, "width": 8, "height": 8, "objects": objects},
        {"image": Image.new("LAB", (8, 8)), "image_id": 2, "width": 8, "height": 8, "objects": objects},
    ]
    transforms = build_train_transforms("light", 64)
    collator = Pix2SeqCollator(processor, transforms=transforms, on_bad_image="skip")
    assert collator(examples)["pixel_values"].shape[0] == 1 and collator.stats["skipped_bad_images"] == 1
    with pytest.raises(ImageReadError, match="image_id 2: PIL images of mode 'LAB'"):
        Pix2SeqCollator(processor, transforms=transforms)(examples)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = Pix2SeqForObjectDetection(tiny_config(layers=1))
    model.generation_config.max_new_tokens = 10
    model.save_pretrained(folder)
    Pix2SeqProcessor.from_config(model.config, image_processor=Pix2SeqImageProcessor(size=64)).save_pretrained(folder)
    return folder


def test_detect_skips_and_lists_a_decompression_bomb_and_reads_phone_photos_upright(tmp_path, saved_model):
    detect = load_example("detect")
    images = tmp_path / "images"
    images.mkdir()
    save_bomb_png(images / "bomb.png")
    save_rotated_jpeg(images / "phone.jpg")
    Image.new("RGB", (30, 30), (0, 200, 0)).save(images / "plain.png")
    out = tmp_path / "out"
    argv = [str(images), "--model", str(saved_model), "--output_dir", str(out), "--greedy", "--threshold", "0"]
    assert detect.main(argv) == 0
    report = json.loads((out / "detections.json").read_text())
    assert report["skipped"] == [str(images / "bomb.png")]
    sizes = {entry["file"]: (entry["width"], entry["height"]) for entry in report["images"]}
    assert sizes == {str(images / "phone.jpg"): (20, 40), str(images / "plain.png"): (30, 30)}
    # --on_bad_image error names the file and stops before detections.json is written.
    with pytest.raises(ImageReadError, match=r"bomb.png.*--on_bad_image skip"):
        detect.main(argv + ["--output_dir", str(tmp_path / "strict"), "--on_bad_image", "error"])
    assert not (tmp_path / "strict" / "detections.json").exists()
