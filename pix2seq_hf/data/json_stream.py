"""
Incremental reading of a JSON file whose top-level value is an object of (possibly very large) arrays, such as a COCO
annotation file: the arrays' elements are decoded a chunk at a time from a buffered read, so the memory used is that of
one chunk, not of the whole file.

Only the top-level object's members and array elements are walked here; every value is decoded by the standard
library's `json` scanner, so strings, escapes and numbers read exactly as `json.load` reads them, and a malformed file
raises `json.JSONDecodeError` with the same kind of message and position (line, column and character of the file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from json.decoder import WHITESPACE


_READ_CHARS = 8 * 2**20
# A failed decode this close to the end of the buffer may only be cut short by it: read more and try again.
_TRUNCATION_MARGIN = 16


class NotAnObjectError(ValueError):
    """The file holds valid JSON whose top-level value is not an object; `type_name` is its Python type's name."""

    def __init__(self, type_name: str):
        super().__init__(f"the top-level JSON value is a {type_name}, not an object")
        self.type_name = type_name


class _Reader:
    """A text file read into a sliding buffer; positions passed around are indices into the current buffer."""

    def __init__(self, handle):
        self._handle = handle
        self.buffer = ""
        self._base = 0  # position in the file of `buffer[0]`
        self._lines = 0  # newlines before `buffer[0]`
        self._last_newline = -1  # position in the file of the last newline before `buffer[0]`
        self.eof = False
        self._scan_once = json.JSONDecoder().scan_once

    def refill(self, index: int) -> int:
        """Drops the buffer before `index`, reads more of the file; returns `index` in the new buffer."""
        dropped = self.buffer[:index]
        newlines = dropped.count("\n")
        if newlines:
            self._lines += newlines
            self._last_newline = self._base + dropped.rfind("\n")
        self._base += index
        chunk = self._handle.read(max(_READ_CHARS, len(self.buffer) - index))
        self.eof = not chunk
        self.buffer = self.buffer[index:] + chunk
        return 0

    def error(self, message: str, index: int) -> json.JSONDecodeError:
        """A `json.JSONDecodeError` at `index` of the buffer, positioned in the whole file as `json.load` does."""
        position = self._base + index
        line = self._lines + self.buffer.count("\n", 0, index) + 1
        newline = self.buffer.rfind("\n", 0, index)
        last_newline = self._base + newline if newline >= 0 else self._last_newline
        error = json.JSONDecodeError(message, "", 0)
        error.pos, error.lineno, error.colno = position, line, position - last_newline
        error.args = (f"{message}: line {line} column {position - last_newline} (char {position})",)
        return error

    def skip_whitespace(self, index: int) -> int:
        """The index of the next non-whitespace character (or of the end of the file)."""
        while True:
            index = WHITESPACE.match(self.buffer, index).end()
            if index < len(self.buffer) or self.eof:
                return index
            index = self.refill(index)

    def char(self, index: int) -> tuple[str, int]:
        """The next non-whitespace character from `index` (`""` at the end of the file) and its index."""
        index = self.skip_whitespace(index)
        return self.buffer[index : index + 1], index

    def value(self, index: int) -> tuple[object, int]:
        """Decodes the JSON value starting at `index`; returns it and the index just after it."""
        while True:
            try:
                value, end = self._scan_once(self.buffer, index)
            except StopIteration as stop:
                failed_at, message = stop.value, "Expecting value"
            except json.JSONDecodeError as error:
                failed_at, message = error.pos, error.msg
            else:
                # A number that ends with the buffer may go on in the file.
                if end < len(self.buffer) or self.eof:
                    return value, end
                index = self.refill(index)
                continue
            cut_short = failed_at >= len(self.buffer) - _TRUNCATION_MARGIN or message.startswith("Unterminated")
            if self.eof or not cut_short:
                raise self.error(message, failed_at)
            index = self.refill(index)


def iter_json_object(path: str | os.PathLike, chunk_size: int = 50_000) -> Iterator[tuple[str, object, int | None]]:
    """
    Walks the members of the JSON object in `path` in file order, decoding array members a chunk at a time.

    Args:
        path (`str` or `os.PathLike`): a UTF-8 JSON file whose top-level value is an object.
        chunk_size (`int`, *optional*, defaults to 50000): the most array elements decoded at once.

    Yields:
        `(key, value, start)`: for a member whose value is an array, `value` is a list of at most `chunk_size` of its
        elements and `start` the position of the first of them in the array (an empty array yields `[]` once, with
        `start` 0); for any other member, its decoded value and `start=None`. A key that appears twice is yielded
        twice (`json.load` keeps the last).

    Raises:
        `json.JSONDecodeError` for a file that is not valid JSON (with the line, column and character of the file),
        `NotAnObjectError` when the top-level value is valid JSON but not an object.
    """
    with open(path, encoding="utf-8") as handle:
        reader = _Reader(handle)
        first, index = reader.char(0)
        if first != "{":
            # Not an object: `json.load` names the problem (bad JSON, a byte-order mark) or gives the value's type.
            handle.seek(0)
            raise NotAnObjectError(type(json.load(handle)).__name__)
        following, index = reader.char(index + 1)
        while following != "}":
            if following != '"':
                raise reader.error("Expecting property name enclosed in double quotes", index)
            key, index = reader.value(index)
            separator, index = reader.char(index)
            if separator != ":":
                raise reader.error("Expecting ':' delimiter", index)
            opening, index = reader.char(index + 1)
            if opening == "[":
                index = yield from _iter_array(reader, key, index + 1, chunk_size)
            else:
                value, index = reader.value(index)
                yield key, value, None
            separator, index = reader.char(index)
            if separator == "}":
                break
            if separator != ",":
                raise reader.error("Expecting ',' delimiter", index)
            following, index = reader.char(index + 1)
            if following != '"':
                raise reader.error("Expecting property name enclosed in double quotes", index)
        trailing, index = reader.char(index + 1)
        if trailing:
            raise reader.error("Extra data", index)


def _iter_array(reader: _Reader, key: str, index: int, chunk_size: int):
    """Yields the chunks of the array whose `[` ends just before `index`; returns the index after its `]`."""
    chunk, start = [], 0
    following, index = reader.char(index)
    if following == "]":
        yield key, chunk, start
        return index + 1
    while True:
        value, index = reader.value(index)
        chunk.append(value)
        separator, index = reader.char(index)
        if separator == "]":
            yield key, chunk, start
            return index + 1
        if separator != ",":
            raise reader.error("Expecting ',' delimiter", index)
        if len(chunk) == chunk_size:
            yield key, chunk, start
            chunk, start = [], start + chunk_size
        index = reader.skip_whitespace(index + 1)
