"""`load_hf` / `save_hf`: HF checkpoint directories in and out.

Loading checks the config.json values, every safetensors header and the whole key set and
every shape before reading any tensor, then reads one tensor at a time from memory-mapped
safetensors and places it on the device, so a bad checkpoint loads nothing and a 7B one never
needs two host copies. Saving never mixes two exports in one directory.
"""
import json
import os
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax import storage
from mllm_jax.convert import destination, finite, hf_config, hf_keys
from mllm_jax.convert.safetensors_io import (INDEX_FILE, CheckpointReader,
                                             write_checkpoint)
from mllm_jax.models import build_model, registry


class CheckpointMismatchError(ValueError):
    pass


def abstract_params(model, boxed=False):
    """Parameter shapes/dtypes of `model` (no allocation), unboxed from logical metadata
    (boxed=True keeps the `nn.Partitioned` boxes, for `sharding.param_shardings`)."""
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                               *registry.init_inputs(model.cfg))
    return variables["params"] if boxed else unbox_shapes(variables["params"])


def unbox_shapes(boxed):
    """The shapes in a tree of boxed abstract parameters, unboxed. Not `nn.meta.unbox`:
    under a mesh (the trainer traces under its abstract mesh) that applies each box's
    sharding constraint, which a shape cannot take."""
    def unbox(x):
        if isinstance(x, nn.Partitioned):
            return x.unbox(apply_constraint=False)
        return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x  # unannotated leaf
    return jax.tree_util.tree_map(unbox, boxed,
                                  is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _expected(model):
    """{hf key: (param path, layer index or None, hf shape)} for every tensor `model` needs."""
    flat = flax.traverse_util.flatten_dict(abstract_params(model))
    out = {}
    for path, leaf in flat.items():
        if hf_keys.is_scanned(path):
            for i in range(leaf.shape[0]):
                p = hf_keys.unstack_path(path, i)
                out[hf_keys.hf_name(p)] = (path, i, hf_keys.hf_shape(p, leaf.shape[1:]))
        else:
            out[hf_keys.hf_name(path)] = (path, None, hf_keys.hf_shape(path, leaf.shape))
    return out, flat


def _match_keys(reader, cfg, expected, layout):
    """{hf key: checkpoint key}; raises naming every missing, unexpected or misshapen key."""
    model_type = cfg.model_type
    found, problems = {}, []
    for key in reader.keys():
        if any(re.search(p, key) for p in hf_keys.IGNORED_KEYS):
            continue
        canon = layout.canonical_key(cfg, key)
        if canon in found:
            problems.append(f"both {found[canon]!r} and {key!r} map to {canon!r}")
        found[canon] = key
    skip = registry.family(cfg).unused_keys(cfg)
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected
                        and not any(re.search(p, k) for p in skip))
    shapes = []
    for k, (_, _, shape) in expected.items():
        shape = layout.stored_shape(cfg, k, shape)
        if k in found and tuple(reader.shape(found[k])) != tuple(shape):
            shapes.append(f"{found[k]} ({reader.file_of(found[k])}): checkpoint "
                          f"{list(reader.shape(found[k]))}, model expects {list(shape)}")
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {abbreviate(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): "
                        f"{abbreviate([found[k] for k in unexpected])}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {abbreviate(shapes)}")
    if problems:
        raise CheckpointMismatchError(
            f"{reader.directory} does not match its config.json "
            f"(model_type {model_type}, {registry.recorded_layout(cfg)} layout); nothing was "
            "loaded:\n  " + "\n  ".join(problems))
    return {k: found[k] for k in expected}


def abbreviate(items, n=8):
    """The first ``n`` items joined with commas, then how many more there are."""
    head = ", ".join(str(i) for i in items[:n])
    return head + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def load_hf(path, *, dtype=None, scan_layers=False, shardings=None, check_finite=False,
            vision_tower=None, **overrides):
    """Reads an HF checkpoint directory. Returns (model, params).

    The directory is in an HF class's layout, or in another program's that a registered
    `CheckpointLayout` reads (the LLaVA repository's, `models.llava_repo`); the config then
    records the layout, and `save_hf` writes it back by default.

    dtype: parameter dtype (None keeps what the checkpoint stores, float32 if mixed).
    scan_layers: build the model with scanned layers (params stacked on a layer axis).
    shardings: optional pytree of `jax.sharding.Sharding` matching params; each tensor is
      placed directly with it.
    check_finite: refuse weights holding NaN or Inf (`NonFiniteWeightsError` naming the
      tensors and their files), tested on the device after loading. Off by default (training
      and `convert` copy what they are given); `generate`, `chat` and `eval` turn it on.
    vision_tower: the directory of the vision tower's own checkpoint, for a layout whose
      config.json names its tower instead of holding its config (the LLaVA repository's
      `mm_vision_tower`, often a hub id); an error for checkpoints that hold theirs.
    overrides: other config fields (e.g. remat_policy="full").
    """
    path = os.fspath(path)
    if storage.is_remote(path):
        raise ValueError(
            f"{path}: an HF checkpoint is read from a local directory (its safetensors files "
            "are memory-mapped); copy it to local disk, or convert it once with `mllm-jax "
            "convert hf-to-orbax` and read the orbax checkpoint from there")
    hf = hf_config.read_config_json(path)
    options = {} if vision_tower is None else {"vision_tower": os.fspath(vision_tower)}
    cfg = hf_config.from_hf(hf, where=os.path.join(path, "config.json"), directory=path,
                            **options)
    cfg.scan_layers = scan_layers
    for k, v in overrides.items():
        cfg[k] = v
    _, layout = hf_config.checkpoint_layout(cfg)
    reader = (layout.open_reader or (lambda c, d: CheckpointReader(d)))(cfg, path)
    if dtype is None:
        stored = {reader.dtype(k) for k in reader.keys()
                  if np.issubdtype(reader.dtype(k), np.floating)
                  or reader.dtype(k).name == "bfloat16"}
        dtype = stored.pop() if len(stored) == 1 else np.dtype(np.float32)
    dtype = jnp.dtype(dtype)
    cfg.param_dtype = dtype.name
    model = build_model(cfg)
    expected, flat = _expected(model)
    keymap = _match_keys(reader, cfg, expected, layout)

    by_path = {}
    for hf_key, (p, layer, _) in expected.items():
        by_path.setdefault(p, []).append((layer, hf_key))
    flat_shardings = (flax.traverse_util.flatten_dict(shardings) if shardings is not None
                      else {})
    out = {}

    def read(hf_key, q):
        stored = layout.from_stored(cfg, hf_key, reader.get(keymap[hf_key]))
        return np.ascontiguousarray(hf_keys.from_hf_layout(q, stored), dtype=dtype)

    for p, entries in by_path.items():
        leaf = flat[p]
        if entries[0][0] is None:
            host = read(entries[0][1], p)
        else:
            host = np.empty(leaf.shape, dtype)
            for layer, hf_key in entries:
                host[layer] = read(hf_key, hf_keys.unstack_path(p, layer))
        out[p] = jax.device_put(host, flat_shardings.get(p))
        del host
    params = flax.traverse_util.unflatten_dict(out)
    if check_finite:
        def describe(item):
            p, layer = item
            key = keymap[hf_keys.hf_name(p if layer is None else hf_keys.unstack_path(p, layer))]
            return f"{key} ({reader.file_of(key)})"
        finite.check_finite(params, path, describe)
    return model, params


def save_hf(model, params, out_dir, *, dtype=None, max_shard_size=5 * 1024 ** 3,
            overwrite=False, layout=None):
    """Writes `params` as an HF checkpoint directory (config.json + safetensors, sharded with
    an index past `max_shard_size` bytes) in the layout of published checkpoints, which
    transformers loads with its own classes. dtype: None keeps each parameter's dtype.

    layout: "hf" (the transformers class's layout) or a registered `CheckpointLayout`'s name
    (e.g. "llava_repo"); None: the layout the model was read from (`load_hf` records it in
    the config), else "hf".

    `out_dir` is created if needed and may hold other files (e.g. a tokenizer), but not an
    earlier export (config.json, *.safetensors, the index): that raises FileExistsError
    unless overwrite=True, which replaces `out_dir` whole. The files are written into a
    temporary sibling directory and moved in once complete, so a failure midway leaves
    `out_dir` as it was."""
    if not overwrite:
        _refuse_earlier_export(out_dir)
    cfg = model.cfg
    _, lay = hf_config.checkpoint_layout(cfg, layout)
    hf = lay.to_hf(cfg)
    params = nn.meta.unbox(params)
    flat = flax.traverse_util.flatten_dict(params)
    expected, abstract = _expected(model)
    if set(flat) != set(abstract):
        extra = sorted("/".join(p) for p in set(flat) - set(abstract))
        missing = sorted("/".join(p) for p in set(abstract) - set(flat))
        raise CheckpointMismatchError(
            f"params do not match the model: missing {abbreviate(missing)}; "
            f"unexpected {abbreviate(extra)}")
    for p, leaf in flat.items():
        if tuple(leaf.shape) != tuple(abstract[p].shape):
            raise CheckpointMismatchError(
                f"param {'/'.join(p)} has shape {tuple(leaf.shape)}, the model expects "
                f"{tuple(abstract[p].shape)}")
    out_dtype = jnp.dtype(dtype) if dtype is not None else None
    stored = {jnp.dtype(l.dtype) for l in flat.values()}
    hf["torch_dtype"] = hf["dtype"] = (out_dtype or (stored.pop() if len(stored) == 1
                                                     else jnp.dtype("float32"))).name

    def make(p, layer, hf_key):
        def fn():
            arr = np.asarray(jax.device_get(flat[p] if layer is None else flat[p][layer]))
            if out_dtype is not None:
                arr = arr.astype(out_dtype)
            q = p if layer is None else hf_keys.unstack_path(p, layer)
            return np.ascontiguousarray(lay.to_stored(cfg, hf_key, hf_keys.to_hf_layout(q, arr)))
        return fn

    entries = []
    for hf_key in expected:
        stored = lay.stored_key(cfg, hf_key)
        if stored is None:
            continue
        p, layer, shape = expected[hf_key]
        shape = lay.stored_shape(cfg, hf_key, shape)
        itemsize = (out_dtype or jnp.dtype(flat[p].dtype)).itemsize
        entries.append((stored, (int(np.prod(shape, dtype=np.int64)) * itemsize,
                                 make(p, layer, hf_key))))
    entries.sort(key=lambda e: _natural(e[0]))
    with destination.staged(out_dir, replace=overwrite) as work:
        write_checkpoint(work, entries, max_shard_bytes=max_shard_size)
        with storage.open_file(storage.join(work, "config.json"), "w") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
    return out_dir


def _refuse_earlier_export(out_dir):
    out_dir = os.fspath(out_dir)
    if storage.is_remote(out_dir):
        if storage.exists(out_dir) and not storage.isdir(out_dir):
            raise FileExistsError(f"{out_dir} exists and is not a directory")
    elif os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    found = sorted(f for f in (storage.listdir(out_dir) if storage.isdir(out_dir) else [])
                   if f in ("config.json", INDEX_FILE) or f.endswith(".safetensors"))
    if found:
        raise FileExistsError(
            f"{out_dir} already holds an HF export ({abbreviate(found, 4)}); pass "
            "overwrite=True to replace the directory whole, or choose another directory")


def _natural(key):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]
