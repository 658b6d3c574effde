"""
An on-disk cache of prepared annotation splits: a memory-mapped Arrow file per (annotation file content, options).

The first process that needs a split builds it and writes it under a file lock; every other process (the other ranks
of a node, later runs) waits for the lock and maps the finished file. A mapped split costs little resident memory,
whatever its size: the operating system pages its rows in when they are read and shares them between processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping

import datasets
import pyarrow as pa
from datasets.arrow_writer import ArrowWriter
from filelock import FileLock

from .schema import AnnotationStats, DetectionSplit


# Bump when the prepared content changes for the same input, so that older caches are not reused.
CACHE_FORMAT_VERSION = 1
_HASH_CHUNK_BYTES = 16 * 2**20


def default_annotation_cache_dir() -> str:
    """The folder of cached annotation splits: `pix2seq_annotations` in the `datasets` cache (`HF_DATASETS_CACHE`)."""
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "pix2seq_annotations")


def file_digest(path: str) -> str:
    """BLAKE2b digest of a file's bytes (read in chunks, so any size fits in memory) and of its size, as hex."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(str(os.path.getsize(path)).encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def annotation_cache_key(annotation_file: str, options: Mapping) -> str:
    """
    The cache entry's name: the annotation file's name, and a hash of its bytes and of `options` (json-serialisable
    settings that change the prepared split, e.g. the image folder and the label map).
    """
    digest = hashlib.blake2b(digest_size=12)
    digest.update(file_digest(annotation_file).encode())
    digest.update(json.dumps({"version": CACHE_FORMAT_VERSION, **options}, sort_keys=True).encode())
    stem = os.path.splitext(os.path.basename(annotation_file))[0]
    return f"{stem}-{digest.hexdigest()}"


def _write(folder: str, tables: Iterable[pa.Table], features: datasets.Features, meta: dict) -> None:
    writer = ArrowWriter(features=features, path=os.path.join(folder, "data.arrow"))
    for table in tables:
        writer.write_table(table)
    writer.finalize()
    with open(os.path.join(folder, "split.json"), "w", encoding="utf-8") as handle:
        json.dump(meta, handle)


def _read(folder: str, split_name: str) -> DetectionSplit:
    with open(os.path.join(folder, "split.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    dataset = datasets.Dataset.from_file(os.path.join(folder, "data.arrow"))
    return DetectionSplit(
        dataset,
        {int(label): name for label, name in meta["id2label"].items()},
        {int(label): category_id for label, category_id in meta["label2category_id"].items()},
        AnnotationStats(**meta["stats"]),
        split_name,
    )


def cached_split(
    key: str,
    build: Callable[[str], tuple[Iterable[pa.Table], datasets.Features, dict, dict, AnnotationStats]],
    cache_dir: str | os.PathLike | None,
    split_name: str,
) -> DetectionSplit:
    """
    The split cached under `key`, built first by `build` when no process has built it yet.

    Args:
        key (`str`): the entry's name (see `annotation_cache_key`).
        build (`Callable`): takes a scratch folder for its temporary files and returns `(tables, features, id2label,
            label2category_id, stats)`, `tables` the split's rows as Arrow tables, written one after the other;
            called once per cache folder, under a lock that other processes wait on. An error leaves no entry behind.
        cache_dir (`str` or `os.PathLike`, *optional*): the cache folder (defaults to
            `default_annotation_cache_dir()`).
        split_name (`str`): names the split in messages.

    Returns:
        `DetectionSplit` whose dataset is memory-mapped from the cache entry.
    """
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_annotation_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    folder = os.path.join(cache_dir, key)
    with FileLock(folder + ".lock"):
        if not os.path.isdir(folder):
            partial, scratch = f"{folder}.incomplete-{os.getpid()}", f"{folder}.scratch-{os.getpid()}"
            for path in (partial, scratch):
                shutil.rmtree(path, ignore_errors=True)
                os.makedirs(path)
            try:
                tables, features, id2label, label2category_id, stats = build(scratch)
                meta = {"id2label": id2label, "label2category_id": label2category_id, "stats": stats.to_dict()}
                _write(partial, tables, features, meta)
                os.replace(partial, folder)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
                shutil.rmtree(scratch, ignore_errors=True)
    return _read(folder, split_name)
