"""Array fingerprints: checksums of a checkpoint's arrays, written beside them and verified
after a restore, so damaged bytes on disk are an error instead of silently wrong weights.

A fingerprint is 64 bits from two 32-bit lanes, each a sum (mod 2^32) over every element
of a mix of the element's bits and its position in the array:
  lane a: sum(bits * (2 * position + 1))        (any single changed element changes it)
  lane b: sum(fmix32(bits + position * K))      (a non-linear mix: reorderings, multiple
                                                  changes)
Integer addition mod 2^32 is associative and commutative, so the value does not depend on
how the array is sharded or in which order it is reduced: a large array, or one spread over
several hosts, is reduced where it lives (jitted, on device) and only the two scalars reach
the host; an array of at most HOST_BYTES that this process holds whole is reduced on the
host with NumPy (the same integer arithmetic, and no compilation per checkpoint layout).
Elements are read as their raw bits (floats are bitcast; 64-bit elements count as two
32-bit words; PRNG key arrays by their key data), so NaN payloads and -0.0 are distinguished.

The record is JSON: {"format": FORMAT, "arrays": {path: {"shape", "dtype", "fingerprint"}}}
with '/'-joined tree paths.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax import storage

FORMAT = "mllm_jax.array_fingerprints/1"
RECORD_FILE = "integrity.json"
_K = np.uint32(0x9E3779B1)
HOST_BYTES = 1 << 24  # arrays up to this size are fingerprinted with NumPy when addressable


class IntegrityError(ValueError):
    """Stored arrays whose bytes differ from what was written."""


def path_str(keypath) -> str:
    """A jax key path as 'a/b/0/c' (dict keys, attribute names and sequence indices)."""
    parts = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _fmix32(h):  # jax or NumPy uint32 arrays
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _as_u32(x):
    """The raw bits of `x` as uint32 (64-bit elements as two words, on a new last axis)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jnp.dtype(x.dtype).itemsize * 8
    if bits == 64:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if not jnp.issubdtype(x.dtype, jnp.unsignedinteger):
        x = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}"))
    return x.astype(jnp.uint32)


def _position(shape):
    """Row-major element index (mod 2^32) of every element, without reshaping the array
    (a reshape of a sharded array could move data between devices)."""
    pos = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(stride % 2**32)
        stride *= shape[d]
    return pos


def _lanes(x):
    u = _as_u32(x)
    pos = _position(u.shape)
    a = jnp.sum(u * (pos * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)
    b = jnp.sum(_fmix32(u + pos * _K), dtype=jnp.uint32)
    return a, b


_lanes_tree = jax.jit(lambda leaves: [_lanes(x) for x in leaves])


def _host_u32(x):
    """`_as_u32` in NumPy, or None for an array to reduce on device (too large, not all
    here, or an element width NumPy cannot view)."""
    if x.nbytes > HOST_BYTES or not getattr(x, "is_fully_addressable", True):
        return None
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    a = np.asarray(x)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if a.dtype.itemsize not in (1, 2, 4, 8):
        return None
    a = np.ascontiguousarray(a)
    if a.dtype.itemsize == 8:  # two 32-bit words per element, low word first
        return a.view(np.uint32).reshape(*a.shape, 2)
    return a.view(np.dtype(f"uint{a.dtype.itemsize * 8}")).astype(np.uint32)


def _host_lanes(u):
    pos = (np.arange(u.size, dtype=np.uint64) % np.uint64(2**32)).astype(np.uint32)
    flat = u.reshape(-1)
    a = np.sum(flat * (pos * np.uint32(2) + np.uint32(1)), dtype=np.uint32)
    b = np.sum(_fmix32(flat + pos * _K), dtype=np.uint32)
    return a, b


def _all_lanes(leaves) -> list:
    """(lane a, lane b) of every leaf: on the host where `_host_u32` allows, the rest in one
    jitted call."""
    host = [_host_u32(x) for x in leaves]
    on_device = [x for x, u in zip(leaves, host) if u is None]
    device = iter(jax.device_get(_lanes_tree(on_device)) if on_device else [])
    return [_host_lanes(u) if u is not None else next(device) for u in host]


def fingerprints(tree) -> dict:
    """{path: {"shape", "dtype", "fingerprint"}} of every array leaf of `tree`."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [path_str(p) for p, _ in flat]
    leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in flat]
    lanes = _all_lanes(leaves)
    out = {}
    for path, x, (a, b) in zip(paths, leaves, lanes):
        dtype = (f"key<{jax.random.key_impl(x)}>"
                 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else str(x.dtype))
        out[path] = {"shape": list(x.shape), "dtype": dtype,
                     "fingerprint": f"{int(a):08x}{int(b):08x}"}
    return out


def record(tree) -> dict:
    """The JSON record of `tree`'s arrays (see the module docstring)."""
    return {"format": FORMAT, "arrays": fingerprints(tree)}


def mismatches(tree, rec, *, only=None) -> list:
    """Paths of `tree` whose shape, dtype or fingerprint differ from `rec`, as
    (path, what) pairs; `only`: check just these paths (e.g. a partial restore)."""
    stored = rec.get("arrays", {})
    got = fingerprints(tree)
    bad = []
    for path, g in got.items():
        if only is not None and path not in only:
            continue
        s = stored.get(path)
        if s is None:
            bad.append((path, "has no fingerprint in the record"))
        elif (list(s["shape"]), s["dtype"]) != (g["shape"], g["dtype"]):
            bad.append((path, f"is {g['dtype']}{g['shape']}, recorded "
                              f"{s['dtype']}{s['shape']}"))
        elif s["fingerprint"] != g["fingerprint"]:
            bad.append((path, f"fingerprint {g['fingerprint']} != recorded "
                              f"{s['fingerprint']}"))
    return bad


def describe(bad, limit=5) -> str:
    lines = [f"{p} {why}" for p, why in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"... and {len(bad) - limit} more")
    return "; ".join(lines)


def write_record(path, tree):
    """Writes `tree`'s record to the JSON file `path` (process 0 only)."""
    rec = record(tree)
    if jax.process_index() == 0:
        storage.write_atomic(path, json.dumps(rec, indent=1, sort_keys=True))
    return rec


def read_record(path):
    """The record in `path`, or None if there is none (written before records existed)."""
    if not storage.exists(path):
        return None
    try:
        with storage.open_file(path) as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path}: the checksum record is unreadable ({e}); the "
                             "checkpoint beside it cannot be verified") from e
    if not isinstance(rec, dict) or "arrays" not in rec:
        raise IntegrityError(f"{path}: not a checksum record (no 'arrays')")
    return rec
