"""Reading and writing safetensors files without a framework in between.

Reading memory-maps each file and hands out one tensor at a time, so converting a 7B
checkpoint never holds two copies of it in host memory. bfloat16 comes through as
`ml_dtypes.bfloat16`.
"""
import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFile:
    """One .safetensors file: `keys()`, `shape(key)`, `dtype(key)`, `get(key)` (a read-only
    memory-mapped view)."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self._offset = 8 + n
        self._mmap = None

    def keys(self):
        return list(self.entries)

    def shape(self, key):
        return tuple(self.entries[key]["shape"])

    def dtype(self, key):
        name = self.entries[key]["dtype"]
        if name not in DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {name}")
        return np.dtype(DTYPES[name])

    def get(self, key):
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self.entries[key]
        start, end = e["data_offsets"]
        raw = self._mmap[self._offset + start:self._offset + end]
        return raw.view(self.dtype(key)).reshape(e["shape"])


class CheckpointReader:
    """All tensors of an HF checkpoint directory (single file or sharded with an index)."""

    def __init__(self, directory):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        single_path = os.path.join(directory, SINGLE_FILE)
        self._files = {}
        self._where = {}
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            for key, fname in weight_map.items():
                path = os.path.join(directory, fname)
                if not os.path.exists(path):
                    raise FileNotFoundError(
                        f"{index_path} lists {fname} (for tensor {key!r}) but the file is missing")
                self._where[key] = path
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
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


def write_checkpoint(directory, named_arrays, max_shard_bytes=5 * 1024 ** 3):
    """Writes an iterable of (name, array factory) pairs as one file or several shards plus
    an index, as `save_pretrained` lays them out. Factories are called one shard at a time."""
    os.makedirs(directory, exist_ok=True)
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
        write_file(os.path.join(directory, fname), arrays)
        weight_map.update({k: fname for k in arrays})
        del arrays
    if len(shards) > 1:
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return weight_map
