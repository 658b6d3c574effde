"""Reads TensorFlow 2 checkpoints (`ckpt-N.index` + `ckpt-N.data-*`) into NumPy arrays, without TensorFlow."""

from __future__ import annotations

import os
import re
import struct

import numpy as np

from .crc32c import crc32c, mask_crc32c


# A TensorFlow checkpoint ("tensor bundle") is an `.index` file, an SSTable in LevelDB's table format whose keys are
# variable names and whose values are `BundleEntryProto` messages (dtype, shape, shard, offset, size), plus one or
# more `.data-SSSSS-of-NNNNN` files holding the raw little-endian tensor bytes. The empty key holds the
# `BundleHeaderProto` (number of shards, endianness). Only what checkpoints written by `tf.train.Checkpoint` use is
# read here: uncompressed table blocks and dense (unsliced) tensors.

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic number
_BLOCK_TRAILER_SIZE = 5  # compression type byte + masked CRC32C

# `tensorflow.DataType` enum values -> NumPy dtypes (DT_STRING, 7, is skipped: it holds the object graph).
_DTYPES = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("u1"),
    5: np.dtype("<i2"),
    6: np.dtype("i1"),
    9: np.dtype("<i8"),
    10: np.dtype("?"),
    17: np.dtype("<u2"),
    19: np.dtype("<f2"),
    22: np.dtype("<u4"),
    23: np.dtype("<u8"),
}
_DT_STRING = 7
_DT_BFLOAT16 = 14


class CheckpointFormatError(ValueError):
    """The file is not a TensorFlow checkpoint, is truncated, or uses a feature this reader does not handle."""


def _read_varint(buffer: bytes, position: int) -> tuple[int, int]:
    """Decodes a base-128 varint at `position`; returns `(value, next_position)`."""
    result, shift = 0, 0
    while True:
        if position >= len(buffer):
            raise CheckpointFormatError("Truncated varint.")
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
        if shift > 63:
            raise CheckpointFormatError("Malformed varint.")


def _parse_proto(buffer: bytes) -> dict[int, list]:
    """
    Parses a protocol-buffer message into `{field_number: [values]}`: varints as `int`, length-delimited fields as
    `bytes`, fixed-width fields as `int`. Enough for the few messages of the checkpoint index.
    """
    fields: dict[int, list] = {}
    position = 0
    while position < len(buffer):
        key, position = _read_varint(buffer, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _read_varint(buffer, position)
        elif wire_type == 1:
            value = struct.unpack_from("<Q", buffer, position)[0]
            position += 8
        elif wire_type == 2:
            length, position = _read_varint(buffer, position)
            value = buffer[position : position + length]
            if len(value) != length:
                raise CheckpointFormatError("Truncated protocol-buffer field.")
            position += length
        elif wire_type == 5:
            value = struct.unpack_from("<I", buffer, position)[0]
            position += 4
        else:
            raise CheckpointFormatError(f"Unsupported protocol-buffer wire type {wire_type}.")
        fields.setdefault(number, []).append(value)
    return fields


def _read_block(data: bytes, offset: int, size: int, path: str) -> bytes:
    """The contents of the table block at `offset` (`size` bytes, without its 5-byte trailer)."""
    if offset + size + _BLOCK_TRAILER_SIZE > len(data):
        raise CheckpointFormatError(f"{path}: block at offset {offset} runs past the end of the file (truncated?).")
    compression = data[offset + size]
    if compression != 0:
        raise CheckpointFormatError(
            f"{path}: block at offset {offset} is compressed (type {compression}); only uncompressed checkpoint "
            "indexes (what TensorFlow writes) are supported."
        )
    return data[offset : offset + size]


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """The `(key, value)` entries of one table block (keys are prefix-compressed against the previous key)."""
    if len(block) < 4:
        raise CheckpointFormatError("Table block too short.")
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * num_restarts
    if end < 0:
        raise CheckpointFormatError("Malformed table block.")
    entries, position, key = [], 0, b""
    while position < end:
        shared, position = _read_varint(block, position)
        non_shared, position = _read_varint(block, position)
        value_length, position = _read_varint(block, position)
        key = key[:shared] + block[position : position + non_shared]
        position += non_shared
        entries.append((key, block[position : position + value_length]))
        position += value_length
    return entries


def _block_handle(buffer: bytes, position: int = 0) -> tuple[int, int, int]:
    """Decodes a `(offset, size)` block handle; returns `(offset, size, next_position)`."""
    offset, position = _read_varint(buffer, position)
    size, position = _read_varint(buffer, position)
    return offset, size, position


def resolve_checkpoint_prefix(path: str) -> str:
    """
    The checkpoint prefix (`.../ckpt-N`) of `path`: a prefix as given, or, for a directory, the checkpoint its
    `checkpoint` file names, else the highest-numbered `ckpt-N.index` in it.

    Raises:
        `FileNotFoundError` when no checkpoint is found.
    """
    if os.path.isdir(path):
        state_file = os.path.join(path, "checkpoint")
        if os.path.isfile(state_file):
            with open(state_file, encoding="utf-8") as handle:
                match = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', handle.read(), flags=re.MULTILINE)
            if match:
                name = match.group(1)
                prefix = name if os.path.isabs(name) else os.path.join(path, name)
                if os.path.isfile(prefix + ".index"):
                    return prefix
        numbered = []
        for name in os.listdir(path):
            match = re.fullmatch(r"(.+-(\d+))\.index", name)
            if match:
                numbered.append((int(match.group(2)), match.group(1)))
        if not numbered:
            raise FileNotFoundError(f"No TensorFlow checkpoint (`ckpt-N.index`) in the directory {path}.")
        return os.path.join(path, max(numbered)[1])
    prefix = path[: -len(".index")] if path.endswith(".index") else path
    if not os.path.isfile(prefix + ".index"):
        raise FileNotFoundError(
            f"No TensorFlow checkpoint at {path}: expected a directory or a prefix such as `.../ckpt-10` with a "
            "`ckpt-10.index` file next to its `.data-*` files."
        )
    return prefix


class TFCheckpointReader:
    """
    The variables of a TensorFlow checkpoint, read with NumPy only.

    Args:
        path (`str`): a checkpoint prefix (`.../ckpt-N`) or a directory (its latest checkpoint is read).
        verify_checksums (`bool`, *optional*, defaults to `True`): check each tensor read against the CRC32C that
            TensorFlow stored for it, as TensorFlow does when it restores (about 1 s per 100 MB).

    Example:

    ```python
    >>> reader = TFCheckpointReader("obj365_pretrain/resnet_640x640_b256_s400k")
    >>> reader.shapes()["model/decoder/ar_decoder.Stoken_embedding/.ATTRIBUTES/VARIABLE_VALUE"]
    (3000, 256)
    >>> array = reader.read("model/decoder/ar_decoder.Stoken_embedding/.ATTRIBUTES/VARIABLE_VALUE")
    ```

    Raises:
        `FileNotFoundError` when there is no checkpoint; [`CheckpointFormatError`] when the index is not a TensorFlow
        checkpoint index or is truncated.
    """

    def __init__(self, path: str, verify_checksums: bool = True):
        self.prefix = resolve_checkpoint_prefix(path)
        self.verify_checksums = verify_checksums
        index_path = self.prefix + ".index"
        with open(index_path, "rb") as handle:
            data = handle.read()
        if len(data) < _FOOTER_SIZE or struct.unpack_from("<Q", data, len(data) - 8)[0] != _TABLE_MAGIC:
            raise CheckpointFormatError(
                f"{index_path} is not a TensorFlow checkpoint index (no table magic number at its end; truncated or "
                "another kind of file)."
            )
        footer = data[len(data) - _FOOTER_SIZE :]
        _, _, position = _block_handle(footer)  # metaindex, unused
        index_offset, index_size, _ = _block_handle(footer, position)

        self._entries: dict[str, dict] = {}
        num_shards = 1
        for _, handle_bytes in _block_entries(_read_block(data, index_offset, index_size, index_path)):
            offset, size, _ = _block_handle(handle_bytes)
            for key, value in _block_entries(_read_block(data, offset, size, index_path)):
                if key == b"":
                    header = _parse_proto(value)
                    num_shards = header.get(1, [1])[0]
                    if header.get(2, [0])[0] != 0:
                        raise CheckpointFormatError(f"{index_path}: big-endian checkpoints are not supported.")
                    continue
                self._entries[key.decode("utf-8")] = self._parse_entry(value)
        self.num_shards = num_shards
        self._data_paths = [f"{self.prefix}.data-{shard:05d}-of-{num_shards:05d}" for shard in range(num_shards)]
        for data_path in self._data_paths:
            if not os.path.isfile(data_path):
                raise FileNotFoundError(f"The checkpoint {self.prefix} is missing its data file {data_path}.")

    @staticmethod
    def _parse_entry(value: bytes) -> dict:
        fields = _parse_proto(value)
        shape = []
        if 2 in fields:
            for dim in _parse_proto(fields[2][0]).get(2, []):
                shape.append(_parse_proto(dim).get(1, [0])[0])
        return {
            "dtype": fields.get(1, [0])[0],
            "shape": tuple(shape),
            "shard": fields.get(3, [0])[0],
            "offset": fields.get(4, [0])[0],
            "size": fields.get(5, [0])[0],
            "sliced": 7 in fields,
            "crc32c": fields.get(6, [None])[0],  # masked, of the tensor's bytes in the data file
        }

    def keys(self) -> list[str]:
        """Names of all the entries of the checkpoint, sorted."""
        return sorted(self._entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """`{name: shape}` of the numeric tensors (strings, such as the object graph, are left out)."""
        return {key: entry["shape"] for key, entry in self._entries.items() if entry["dtype"] != _DT_STRING}

    def read(self, key: str) -> np.ndarray:
        """
        The value of the variable `key` as a NumPy array (bfloat16 is returned as float32).

        Raises:
            `KeyError` for an unknown name; [`CheckpointFormatError`] for string or sliced tensors, data that runs
            past the end of its file, or (with `verify_checksums`) data whose CRC32C is not the one stored for it.
        """
        if key not in self._entries:
            raise KeyError(f"The checkpoint {self.prefix} has no variable {key!r}.")
        entry = self._entries[key]
        if entry["sliced"]:
            raise CheckpointFormatError(f"{key}: partitioned (sliced) variables are not supported.")
        dtype_id = entry["dtype"]
        if dtype_id == _DT_BFLOAT16:
            dtype = np.dtype("<u2")
        elif dtype_id in _DTYPES:
            dtype = _DTYPES[dtype_id]
        else:
            raise CheckpointFormatError(f"{key}: tensors of TensorFlow dtype {dtype_id} are not supported.")
        count = int(np.prod(entry["shape"], dtype=np.int64))
        if entry["size"] != count * dtype.itemsize:
            raise CheckpointFormatError(
                f"{key}: {entry['size']} bytes stored for shape {entry['shape']} of {dtype} (expected "
                f"{count * dtype.itemsize})."
            )
        data_path = self._data_paths[entry["shard"]]
        with open(data_path, "rb") as handle:
            handle.seek(entry["offset"])
            raw = handle.read(entry["size"])
        if len(raw) != entry["size"]:
            raise CheckpointFormatError(
                f"{key}: {data_path} ends before the tensor's {entry['size']} bytes at offset {entry['offset']} "
                "(truncated checkpoint)."
            )
        if self.verify_checksums and entry["crc32c"] is not None:
            computed = mask_crc32c(crc32c(raw))
            if computed != entry["crc32c"]:
                raise CheckpointFormatError(
                    f"{key}: its {entry['size']} bytes at offset {entry['offset']} of {data_path} do not match the "
                    f"checksum stored in {self.prefix}.index (masked CRC32C {entry['crc32c']:#010x}, computed "
                    f"{computed:#010x}): the checkpoint is corrupt (a damaged download or copy). Download it again."
                )
        array = np.frombuffer(raw, dtype=dtype).reshape(entry["shape"])
        if dtype_id == _DT_BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array.copy()


__all__ = ["CheckpointFormatError", "TFCheckpointReader", "resolve_checkpoint_prefix"]
