"""
CRC32C (Castagnoli), the checksum TensorFlow stores for every tensor of a checkpoint, computed with NumPy.

A byte-at-a-time table loop in Python runs at a few MB/s; a checkpoint of the paper's models holds 150 MB. Here the
data is cut into many lanes of equal length whose CRCs are computed side by side (one vectorised table step per 4
bytes of every lane at once), then merged pairwise: a CRC register is linear over GF(2), so the CRC of `A + B` is the
CRC of `A` carried through `len(B)` zero bytes (a 32 x 32 bit matrix, applied with byte tables), XOR the CRC of `B`
started from zero. About 0.1-0.3 s per 100 MB.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


_POLYNOMIAL = 0x82F63B78  # Castagnoli, bit-reversed
_MASK_DELTA = 0xA282EAD8
_MIN_LANE_BYTES = 256  # shorter data is not worth the lanes' merging: a plain loop over its bytes
_MAX_LANES = 1 << 16


def _byte_tables() -> np.ndarray:
    """`tables[k][b]`: the register after byte `b` followed by `k` zero bytes (slicing-by-4 tables), as uint32."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLYNOMIAL), table >> 1).astype(np.uint32)
    tables = [table]
    for _ in range(3):
        previous = tables[-1]
        tables.append((previous >> 8) ^ table[previous & 0xFF])
    return np.stack(tables)


_TABLES = _byte_tables()
_TABLE0 = [int(v) for v in _TABLES[0]]


def _update_bytes(register: int, data: bytes) -> int:
    """The register after `data`, one byte at a time (for short data)."""
    table = _TABLE0
    for byte in data:
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


@lru_cache(maxsize=64)
def _zeros_operator(num_bytes: int) -> np.ndarray:
    """
    The linear map "carry the register through `num_bytes` zero bytes", as 4 tables of 256 uint32: the register `r`
    becomes `T[0][r & 0xFF] ^ T[1][(r >> 8) & 0xFF] ^ T[2][(r >> 16) & 0xFF] ^ T[3][r >> 24]`.
    """
    # The images of the 32 basis registers, carried through the zeros by doubling (squaring the map).
    basis = np.uint32(1) << np.arange(32, dtype=np.uint32)
    images = basis.copy()
    step = np.array([_update_bytes(int(v), b"\0") for v in basis], dtype=np.uint32)  # one zero byte
    remaining = num_bytes
    while remaining:
        if remaining & 1:
            images = _apply_columns(step, images)
        step = _apply_columns(step, step)
        remaining >>= 1
    return _columns_to_tables(images)


def _apply_columns(columns: np.ndarray, registers: np.ndarray) -> np.ndarray:
    """Applies the map whose image of bit `i` is `columns[i]` to each register of `registers`."""
    out = np.zeros_like(registers)
    for bit in range(32):
        out ^= np.where((registers >> np.uint32(bit)) & 1, columns[bit], np.uint32(0)).astype(np.uint32)
    return out


def _columns_to_tables(columns: np.ndarray) -> np.ndarray:
    values = np.arange(256, dtype=np.uint32)
    tables = np.zeros((4, 256), dtype=np.uint32)
    for k in range(4):
        for bit in range(8):
            tables[k] ^= np.where((values >> np.uint32(bit)) & 1, columns[8 * k + bit], np.uint32(0)).astype(np.uint32)
    return tables


def _apply_tables(tables: np.ndarray, registers: np.ndarray) -> np.ndarray:
    return (
        tables[0][registers & 0xFF]
        ^ tables[1][(registers >> 8) & 0xFF]
        ^ tables[2][(registers >> 16) & 0xFF]
        ^ tables[3][registers >> 24]
    )


def _update(register: int, data: np.ndarray) -> int:
    """The register (not inverted) after the bytes `data` (uint8), starting from `register`."""
    size = data.size
    if size < 2 * _MIN_LANE_BYTES:
        return _update_bytes(register, data.tobytes())
    lanes = 1 << min((size // _MIN_LANE_BYTES).bit_length() - 1, _MAX_LANES.bit_length() - 1)
    lane_words = size // (4 * lanes)
    head = lanes * lane_words * 4
    # Words of each lane, lane-major in memory after the transpose: row `j` holds word `j` of every lane.
    words = np.ascontiguousarray(data[:head].view("<u4").reshape(lanes, lane_words).T)
    registers = np.zeros(lanes, dtype=np.uint32)
    registers[0] = register
    t0, t1, t2, t3 = _TABLES[3], _TABLES[2], _TABLES[1], _TABLES[0]
    for row in words:
        registers ^= row
        registers = t0[registers & 0xFF] ^ t1[(registers >> 8) & 0xFF] ^ t2[(registers >> 16) & 0xFF] ^ t3[registers >> 24]
    # Merge neighbouring lanes: (a, b) -> a carried through len(b) zero bytes, XOR b.
    lane_bytes = lane_words * 4
    while registers.size > 1:
        carried = _apply_tables(_zeros_operator(lane_bytes), registers[0::2])
        registers = carried ^ registers[1::2]
        lane_bytes *= 2
    return _update(int(registers[0]), data[head:])


def crc32c(data) -> int:
    """The CRC32C of `data` (`bytes`, `bytearray`, `memoryview` or a uint8 NumPy array), as TensorFlow computes it."""
    array = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    return _update(0xFFFFFFFF, array) ^ 0xFFFFFFFF


def mask_crc32c(crc: int) -> int:
    """The masked form TensorFlow (and LevelDB) store: rotated right by 15 bits, plus a constant."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


__all__ = ["crc32c", "mask_crc32c"]
