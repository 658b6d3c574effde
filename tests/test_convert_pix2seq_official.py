"""
Conversion of official Pix2Seq checkpoints, checked against the official implementation's outputs.

The fixtures in `tests/fixtures/official_tiny_*` are narrow, shallow models built and saved by the official code
(TensorFlow) with seeded random weights, with that code's outputs (`tests/make_official_reference.py` wrote them;
`tests/official_parity.py` measures a conversion against them). No TensorFlow is needed here.
"""

import os
import shutil
import struct

import numpy as np
import pytest
import torch

from pix2seq_hf.convert_pix2seq_original_tf_checkpoint_to_pytorch import (
    COCO_CATEGORIES,
    ConversionError,
    convert_pix2seq_checkpoint,
    id2label_for,
    infer_architecture,
    read_official_variables,
)
from pix2seq_hf.tf_checkpoint import CheckpointFormatError, TFCheckpointReader, resolve_checkpoint_prefix

from official_parity import compare, stem_pool_ablation


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
VARIANTS = ["official_tiny_r50", "official_tiny_r50_c4", "official_tiny_vit"]


def fixture_path(name: str) -> str:
    return os.path.join(FIXTURES, name)


# ---------------------------------------------------------------------------------------------------------------------
# A minimal tensor-bundle writer, to build checkpoints the official trainer would never write (errors).
# ---------------------------------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
    return body + struct.pack("<II", 0, 1)


def write_bundle(prefix: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes float32 `tensors` as a TensorFlow checkpoint (`prefix.index`, `prefix.data-00000-of-00001`)."""
    data, entries = b"", [(b"", _field(1, 0, _varint(1)))]  # header: one shard
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name], dtype="<f4")
        shape = b"".join(_field(2, 2, _varint(len(d)) + d) for d in (_field(1, 0, _varint(n)) for n in array.shape))
        entry = (
            _field(1, 0, _varint(1))
            + _field(2, 2, _varint(len(shape)) + shape)
            + _field(4, 0, _varint(len(data)))
            + _field(5, 0, _varint(array.nbytes))
        )
        entries.append((name.encode(), entry))
        data += array.tobytes()
    with open(prefix + ".data-00000-of-00001", "wb") as handle:
        handle.write(data)
    block = _block(entries)
    index = block + b"\0\0\0\0\0"
    index_block = _block([(entries[-1][0], _varint(0) + _varint(len(block)))])
    index_offset = len(index)
    index += index_block + b"\0\0\0\0\0"
    metaindex_offset = len(index)
    metaindex = _block([])
    index += metaindex + b"\0\0\0\0\0"
    handles = _varint(metaindex_offset) + _varint(len(metaindex)) + _varint(index_offset) + _varint(len(index_block))
    index += handles + b"\0" * (40 - len(handles)) + struct.pack("<Q", 0xDB4775248B80FB57)
    with open(prefix + ".index", "wb") as handle:
        handle.write(index)


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def test_reader_reads_the_official_checkpoint():
    reader = TFCheckpointReader(fixture_path("official_tiny_r50"))
    assert reader.prefix.endswith("ckpt-1")
    shapes = reader.shapes()
    assert "_CHECKPOINTABLE_OBJECT_GRAPH" in reader.keys() and "_CHECKPOINTABLE_OBJECT_GRAPH" not in shapes
    assert "save_counter/.ATTRIBUTES/VARIABLE_VALUE" in shapes
    name = "model/decoder/ar_decoder.Stoken_embedding/.ATTRIBUTES/VARIABLE_VALUE"
    embedding = reader.read(name)
    assert embedding.shape == shapes[name] == (3000, 32) and embedding.dtype == np.float32
    assert np.isfinite(embedding).all() and embedding.std() > 0.1
    assert int(reader.read("save_counter/.ATTRIBUTES/VARIABLE_VALUE")) == 1


def test_reader_round_trips_written_tensors(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a/kernel": rng.normal(size=(3, 4, 5)), "b": rng.normal(size=(7,)), "scalar": np.array(2.5)}
    write_bundle(str(tmp_path / "ckpt-3"), tensors)
    reader = TFCheckpointReader(str(tmp_path))  # a directory: the highest-numbered checkpoint
    assert reader.prefix == str(tmp_path / "ckpt-3")
    for name, value in tensors.items():
        np.testing.assert_array_equal(reader.read(name), value.astype(np.float32))


def test_resolve_checkpoint_prefix(tmp_path):
    assert resolve_checkpoint_prefix(fixture_path("official_tiny_vit") + "/ckpt-1.index").endswith("ckpt-1")
    with pytest.raises(FileNotFoundError, match="No TensorFlow checkpoint"):
        resolve_checkpoint_prefix(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ckpt-7"):
        resolve_checkpoint_prefix(str(tmp_path / "ckpt-7"))


def test_truncated_checkpoints_are_refused(tmp_path):
    source = fixture_path("official_tiny_vit")
    for name in os.listdir(source):
        shutil.copy(os.path.join(source, name), tmp_path / name)
    data_file = tmp_path / "ckpt-1.data-00000-of-00001"
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        read_official_variables(str(tmp_path))

    index_file = tmp_path / "ckpt-1.index"
    index_file.write_bytes(index_file.read_bytes()[:-100])
    with pytest.raises(CheckpointFormatError, match="not a TensorFlow checkpoint index"):
        TFCheckpointReader(str(tmp_path))



def test_a_corrupt_byte_is_found_by_the_stored_checksum_and_the_tensor_named(tmp_path):
    source = fixture_path("official_tiny_r50")
    for name in os.listdir(source):
        shutil.copy(os.path.join(source, name), tmp_path / name)
    reader = TFCheckpointReader(str(tmp_path))
    name = "model/decoder/ar_decoder.Stoken_embedding/.ATTRIBUTES/VARIABLE_VALUE"
    entry = reader._entries[name]
    # One byte flipped inside that tensor, the file size unchanged: the values still look like floats.
    data_file = tmp_path / "ckpt-1.data-00000-of-00001"
    data = bytearray(data_file.read_bytes())
    data[entry["offset"] + entry["size"] // 2] ^= 0x40
    data_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="Stoken_embedding.*checksum.*corrupt"):
        read_official_variables(str(tmp_path))
    with pytest.raises(CheckpointFormatError, match="Stoken_embedding"):
        convert_pix2seq_checkpoint(str(tmp_path))
    # The other tensors still read, and the check can be turned off.
    assert reader.read("save_counter/.ATTRIBUTES/VARIABLE_VALUE") == 1
    assert TFCheckpointReader(str(tmp_path), verify_checksums=False).read(name).shape == (3000, 32)


def test_crc32c_matches_the_byte_by_byte_definition():
    from pix2seq_hf.crc32c import crc32c, mask_crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    assert crc32c(b"") == 0
    rng = np.random.default_rng(0)
    for size in (1, 7, 511, 512, 4099, 70001):  # one byte loop, lanes, lanes and a remainder
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        crc = 0xFFFFFFFF
        for byte in data:  # the definition, bit by bit
            crc ^= byte
            for _ in range(8):
                crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        assert crc32c(data) == crc ^ 0xFFFFFFFF, size
    assert mask_crc32c(0) == 0xA282EAD8 and mask_crc32c(1 << 15) == 0xA282EAD9

def test_a_checkpoint_without_a_pix2seq_model_is_refused(tmp_path):
    write_bundle(str(tmp_path / "ckpt-1"), {"dense/kernel/.ATTRIBUTES/VARIABLE_VALUE": np.ones((2, 2))})
    with pytest.raises(ConversionError, match="not a checkpoint written by the official Pix2Seq trainer"):
        convert_pix2seq_checkpoint(str(tmp_path))

    other = tmp_path / "other"
    other.mkdir()
    write_bundle(str(other / "ckpt-1"), {"model/encoder/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE": np.ones((2, 2))})
    with pytest.raises(ConversionError, match="not a Pix2Seq encoder-decoder"):
        convert_pix2seq_checkpoint(str(other))


# ---------------------------------------------------------------------------------------------------------------------
# Architecture and mapping
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kind, backbone_stages",
    [("official_tiny_r50", "resnet", 4), ("official_tiny_r50_c4", "resnet-c4", 3), ("official_tiny_vit", "vit", 0)],
)
def test_architecture_is_read_from_the_variables(name, kind, backbone_stages):
    architecture = infer_architecture(read_official_variables(fixture_path(name)))
    assert architecture["kind"] == kind
    config = architecture["config"]
    assert config["encoder_layers"] == 2 and config["encoder_hidden_size"] == 64
    assert config["vocab_size"] == 3000 and config["max_position_embeddings"] == 512
    if backbone_stages:
        assert config["stem_pool_padding"] == "same"
        assert list(config["backbone_config"].depths) == [3, 4, 6, 3][:backbone_stages]
        assert config["backbone_config"].embedding_size == 4  # width x 1/16
    else:
        assert config["encoder_stem"] == "patch" and config["patch_size"] == 16


def test_unknown_architectures_and_misfits_are_refused():
    variables = read_official_variables(fixture_path("official_tiny_r50"))

    no_encoder = {k: v for k, v in variables.items() if not k.startswith("encoder/")}
    with pytest.raises(ConversionError, match="Unknown encoder"):
        infer_architecture(no_encoder)

    shallow = {k: v for k, v in variables.items() if "block_groups/2/layers/5" not in k}
    with pytest.raises(ConversionError, match=r"block groups \[3, 4, 5, 3\]"):
        infer_architecture(shallow)

    from pix2seq_hf import Pix2SeqForObjectDetection
    from pix2seq_hf.convert_pix2seq_original_tf_checkpoint_to_pytorch import build_config, convert_state_dict

    model = Pix2SeqForObjectDetection(build_config(variables, id2label_for("coco", None)))
    extra = dict(variables, **{"encoder/extra_head/kernel": np.zeros((2, 2), np.float32)})
    with pytest.raises(ConversionError, match="no place in the model: model/encoder/extra_head/kernel"):
        convert_state_dict(extra, model)
    missing = {k: v for k, v in variables.items() if k != "decoder/output_ln/gamma"}
    with pytest.raises(ConversionError, match="without a value: model.decoder.layer_norm.weight"):
        convert_state_dict(missing, model)
    wrong = dict(variables, **{"proj/bias": np.zeros(5, np.float32)})
    with pytest.raises(ConversionError, match=r"shape mismatch.*model/proj/bias \(5,\)"):
        convert_state_dict(wrong, model)


def test_class_tokens_are_official_category_ids():
    id2label = id2label_for("coco", None)
    assert len(id2label) == 91 and id2label[1] == "person" and id2label[90] == "toothbrush" and id2label[12] == "N/A"
    assert sum(name != "N/A" for name in id2label.values()) == len(COCO_CATEGORIES) == 80

    model, processor = convert_pix2seq_checkpoint(fixture_path("official_tiny_vit"), image_size=64)
    layout = model.config.token_layout
    assert layout.class_token_offset == 100 and layout.num_classes == 91
    # A hand-written object whose class token is 101 (COCO "person") decodes as label 1.
    tokens = torch.tensor([[1000 + 100, 1000 + 200, 1000 + 500, 1000 + 600, 101]])
    logits = torch.full((1, 5, 3000), -10.0)
    logits[0, 4, 101] = 10.0
    decoded = model.box_codec.decode(tokens, logits)[0]
    assert decoded["labels"].tolist() == [1] and model.config.id2label[1] == "person"


def test_categories_file(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text('{"categories": [{"id": 1, "name": "Person"}, {"id": 3, "name": "Sneakers"}]}')
    assert id2label_for(None, str(path)) == {0: "N/A", 1: "Person", 2: "N/A", 3: "Sneakers"}
    path.write_text('{"5": "x"}')
    assert id2label_for(None, str(path))[5] == "x"
    path.write_text('{"900": "x"}')
    with pytest.raises(ConversionError, match="inside the coordinate tokens"):
        id2label_for(None, str(path))


# ---------------------------------------------------------------------------------------------------------------------
# Numerical parity with the official implementation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_converted_model_reproduces_the_official_outputs(name):
    results = compare(fixture_path(name))
    assert results["pixels"] <= 1e-5, results
    assert results["backbone_features"] <= 1e-4 * max(1.0, float(np.abs(np.load(
        os.path.join(fixture_path(name), "reference.npz"))["backbone_features"]).max())), results
    assert results["encoder_output"] <= 1e-4 and results["encoded"] <= 1e-4, results
    assert results["logits"] <= 1e-4, results
    assert results["top_p_mask_mismatches"] == 0 and results["top_p_kept_tokens"] > 1, results
    assert results["greedy_tokens"] == 500 and results["greedy_mismatches"] == 0, results
    assert results["greedy_logits"] <= 1e-4, results


def test_symmetric_stem_pool_breaks_parity():
    """The 'SAME' stem pool is what makes the ResNet match: with symmetric padding pooled values and logits move."""
    ablation = stem_pool_ablation(fixture_path("official_tiny_r50"))
    assert ablation["pooled_values_changed"] > 0.1 and ablation["logits_change"] > 0.1, ablation


# ---------------------------------------------------------------------------------------------------------------------
# The converted folder as users load it
# ---------------------------------------------------------------------------------------------------------------------


def test_converted_folder_loads_with_auto_classes_and_pipeline(tmp_path):
    from transformers import AutoModelForObjectDetection, AutoProcessor, pipeline

    import pix2seq_hf  # noqa: F401  (registers the Auto classes)

    output = tmp_path / "converted"
    convert_pix2seq_checkpoint(fixture_path("official_tiny_r50_c4"), str(output), image_size=96)
    model = AutoModelForObjectDetection.from_pretrained(output).eval()
    processor = AutoProcessor.from_pretrained(output)
    assert model.config.stem_pool_padding == "same" and model.config.id2label[1] == "person"
    assert processor.image_processor.official_resize and not processor.image_processor.do_normalize
    assert processor.image_processor.size["longest_edge"] == 96
    assert model.generation_config.coordinate_window == 0  # the official reading of the coordinates

    reference = np.load(os.path.join(fixture_path("official_tiny_r50_c4"), "reference.npz"))
    pixels = processor.image_processor(reference["image"], return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(pixels.permute(0, 2, 3, 1).numpy(), reference["pixel_values"], atol=1e-5)
    with torch.no_grad():
        logits = model(
            pixel_values=torch.from_numpy(reference["pixel_values"]).permute(0, 3, 1, 2),
            decoder_input_ids=torch.from_numpy(reference["input_tokens"]),
        ).logits
    np.testing.assert_allclose(logits.numpy(), reference["logits"], atol=1e-4)

    from PIL import Image

    detector = pipeline("object-detection", model=model, image_processor=processor.image_processor)
    torch.manual_seed(0)
    detections = detector(Image.fromarray(reference["image"]), threshold=0.0)
    assert isinstance(detections, list)
    assert all(d["label"] in model.config.id2label.values() for d in detections)


def test_converter_does_not_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_pix2seq_checkpoint(fixture_path("official_tiny_vit"), str(tmp_path), image_size=64)
    assert (tmp_path / "keep.txt").read_text() == "mine"
