"""Reading and writing safetensors files without a framework in between.

Reading memory-maps each file and hands out one tensor at a time, so converting a 7B
checkpoint never holds two copies of it in host memory. bfloat16 comes through as
`ml_dtypes.bfloat16`.
"""
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from mllm_jax import jsonfile, storage

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsError(ValueError):
    """A safetensors file, or the index of a sharded checkpoint, that cannot be read as
    it claims to be: the message names the file and the tensor or entry."""


# The safetensors format's own limit on the JSON header (its reference reader refuses more).
MAX_HEADER_BYTES = 100 * 1000 * 1000
_DAMAGED = "the file is truncated or damaged; export or download it again"


class SafetensorsFile:
    """One .safetensors file: `keys()`, `shape(key)`, `dtype(key)`, `get(key)` (a read-only
    memory-mapped view).

    The header is checked before any data is read: its length within the file, valid JSON,
    every tensor a known dtype with a shape of non-negative ints, its `data_offsets` inside
    the data section, holding exactly shape x dtype size bytes, and no two tensors sharing
    bytes. A violation raises `SafetensorsError` naming the file and the tensor."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors "
                                       f"header; {_DAMAGED}")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise SafetensorsError(
                    f"{path}: the header claims {n} bytes but the file holds {size - 8} after "
                    f"the length field; {_DAMAGED}")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: the header is not valid JSON ({e}); "
                                   f"{_DAMAGED}") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{path}: the header is not a JSON object; {_DAMAGED}")
        metadata = header.pop("__metadata__", None)
        self.metadata = metadata if isinstance(metadata, dict) else {}
        self.entries = header
        self._offset = 8 + n
        self._check_entries(size - 8 - n)
        self._mmap = None

    def _check_entries(self, data_size):
        spans = []
        for key, e in self.entries.items():
            where = f"{self.path}: tensor {key!r}"
            if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
                raise SafetensorsError(f"{where}: the header entry needs dtype, shape and "
                                       f"data_offsets; {_DAMAGED}")
            name, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
            if name not in DTYPES:
                raise SafetensorsError(f"{where}: unknown dtype {name!r} (known: "
                                       f"{', '.join(DTYPES)})")
            if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
                raise SafetensorsError(f"{where}: shape {shape!r} is not a list of "
                                       f"non-negative ints; {_DAMAGED}")
            if not (isinstance(offsets, list) and len(offsets) == 2
                    and all(_is_int(o) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
                raise SafetensorsError(f"{where}: data_offsets {offsets!r} are not "
                                       f"[start, end] with 0 <= start <= end; {_DAMAGED}")
            start, end = offsets
            if end > data_size:
                raise SafetensorsError(
                    f"{where}: data_offsets [{start}, {end}] reach past the end of the data "
                    f"({data_size} bytes); {_DAMAGED}")
            need = math.prod(shape) * np.dtype(DTYPES[name]).itemsize
            if end - start != need:
                raise SafetensorsError(
                    f"{where}: holds {end - start} bytes but dtype {name} and shape {shape} "
                    f"need {need}; its dtype or shape is mislabelled")
            if end > start:
                spans.append((start, end, key))
        spans.sort()
        for (_, prev_end, prev), (start, end, key) in zip(spans, spans[1:]):
            if start < prev_end:
                raise SafetensorsError(
                    f"{self.path}: tensors {prev!r} and {key!r} share bytes (data_offsets "
                    f"overlap at [{start}, {min(end, prev_end)}]); {_DAMAGED}")

    def keys(self):
        return list(self.entries)

    def shape(self, key):
        return tuple(self.entries[key]["shape"])

    def dtype(self, key):
        return np.dtype(DTYPES[self.entries[key]["dtype"]])

    def get(self, key):
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self.entries[key]
        start, end = e["data_offsets"]
        raw = self._mmap[self._offset + start:self._offset + end]
        return raw.view(self.dtype(key)).reshape(e["shape"])


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class CheckpointReader:
    """All tensors of an HF checkpoint directory (single file or sharded with an index).

    The index's shard names must stay inside the directory: an absolute name, a `..`, or a
    subdirectory that is a symlink leading elsewhere is refused, naming the index and the
    entry. (A shard file that is itself a symlink is followed, as in the hub cache, where
    every file of a snapshot links into its `blobs/`.)"""

    def __init__(self, directory):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        single_path = os.path.join(directory, SINGLE_FILE)
        self._files = {}
        self._where = {}
        if os.path.exists(index_path):
            weight_map = read_index(index_path)
            for key, fname in weight_map.items():
                path = shard_path(directory, fname, f"{index_path}: weight_map[{key!r}]")
                if not os.path.exists(path):
                    raise FileNotFoundError(
                        f"{index_path} lists {fname} (for tensor {key!r}) but the file is missing")
                self._where[key] = path
            for key, path in self._where.items():
                if key not in self._file(path).entries:
                    raise SafetensorsError(
                        f"{index_path} places tensor {key!r} in {os.path.basename(path)}, "
                        "which does not hold it; the index belongs to another export")
        elif os.path.exists(single_path):
            for key in self._file(single_path).keys():
                self._where[key] = single_path
        else:
            found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if len(found) != 1:
                raise FileNotFoundError(
                    f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}"
                    + (f" (found {found})" if found else "")
                    + "; export the checkpoint with safetensors (save_pretrained does)")
            path = os.path.join(directory, found[0])
            for key in self._file(path).keys():
                self._where[key] = path

    def _file(self, path):
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

    def keys(self):
        return list(self._where)

    def shape(self, key):
        return self._file(self._where[key]).shape(key)

    def dtype(self, key):
        return self._file(self._where[key]).dtype(key)

    def get(self, key):
        return self._file(self._where[key]).get(key)

    def file_of(self, key):
        return os.path.basename(self._where[key])


def read_index(index_path) -> dict:
    """The `weight_map` of a sharded checkpoint's index: {tensor name: shard file name}."""
    index = jsonfile.read_object(index_path, _DAMAGED, SafetensorsError)
    weight_map = index.get("weight_map")
    if not (isinstance(weight_map, dict)
            and all(isinstance(v, str) for v in weight_map.values())):
        raise SafetensorsError(f"{index_path} has no weight_map of tensor name -> shard file "
                               f"name; {_DAMAGED}")
    return weight_map


def shard_path(directory, fname, where) -> str:
    """`directory/fname`, refused (naming `where`) unless it resolves inside `directory`."""
    parts = fname.replace("\\", "/").split("/")
    if not fname or os.path.isabs(fname) or ".." in parts:
        raise SafetensorsError(f"{where} = {fname!r} points outside the checkpoint directory; "
                               "an index names its shard files relative to the directory, "
                               "inside it: restore the checkpoint's index")
    path = os.path.join(directory, fname)
    root = os.path.realpath(directory)
    parent = os.path.realpath(os.path.dirname(path))
    if os.path.commonpath([root, parent]) != root:
        raise SafetensorsError(f"{where} = {fname!r} resolves to {parent}, outside the "
                               f"checkpoint directory {root}: restore the checkpoint's index "
                               "or copy the shards into the directory")
    return path


def write_file(path, tensors: dict, metadata=None):
    """Writes {name: np.ndarray} to one safetensors file, streaming tensor by tensor."""
    header, offset = {}, 0
    for key, arr in tensors.items():
        dt = np.dtype(arr.dtype)
        if dt not in NAMES:
            raise ValueError(f"tensor {key!r}: dtype {dt} cannot be stored in safetensors")
        nbytes = int(np.prod(arr.shape, dtype=np.int64)) * dt.itemsize
        header[key] = {"dtype": NAMES[dt], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data must start 8-byte aligned
    with storage.open_file(path, "wb") as f:  # a gs:// file is uploaded as it is written
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


def write_checkpoint(directory, named_arrays, max_shard_bytes=5 * 1024 ** 3):
    """Writes an iterable of (name, array factory) pairs as one file or several shards plus
    an index, as `save_pretrained` lays them out. Factories are called one shard at a time."""
    storage.makedirs(directory)
    shards, current, size = [], {}, 0
    for name, (nbytes, make) in named_arrays:
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = make
        size += nbytes
    if current or not shards:
        shards.append(current)
    total = 0
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = SINGLE_FILE if len(shards) == 1 else (
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        arrays = {k: make() for k, make in shard.items()}
        total += sum(a.nbytes for a in arrays.values())
        write_file(storage.join(directory, fname), arrays)
        weight_map.update({k: fname for k in arrays})
        del arrays
    if len(shards) > 1:
        with storage.open_file(storage.join(directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return weight_map
