"""`save_orbax` / `load_orbax`: converted models as orbax checkpoints.

A directory holds `model_config.json` (the model's ConfigDict, `cfg.to_json()`),
`params/` (an orbax StandardCheckpointer checkpoint of the parameter pytree) and
`integrity.json` (every array's fingerprint, `convert.integrity`: `load_orbax` recomputes
them and raises naming the array if the stored bytes changed; a directory written before
records existed loads unverified). The config
alone rebuilds the module, so a checkpoint restores without the HF files it came from, and
directly onto any sharding: orbax reads each shard of each array where it is placed.
"""

import flax
import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from mllm_jax import config as mc, storage
from mllm_jax.convert import finite, integrity
from mllm_jax.convert.hf_io import CheckpointMismatchError, abbreviate, abstract_params
from mllm_jax.models import build_model, check_config

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def save_orbax(model, params, out_dir, *, overwrite=False):
    """Writes `params` of `model` to `out_dir` (created if needed). Returns `out_dir`.

    overwrite: replace an existing checkpoint in `out_dir` instead of raising.
    Every process of a multi-host run calls this with its (global) arrays; orbax writes each
    shard once, and process 0 writes the config.
    """
    out_dir = storage.absolute(out_dir)  # a gs:// directory goes to orbax as it is
    params_dir = storage.join(out_dir, PARAMS_DIR)
    if storage.exists(params_dir) and not overwrite:
        raise FileExistsError(f"{params_dir} exists; pass overwrite=True to replace it")
    params = nn.meta.unbox(params)
    _check_structure(model, params, what="params")
    storage.makedirs(out_dir)
    record_file = storage.join(out_dir, integrity.RECORD_FILE)
    if jax.process_index() == 0 and storage.exists(record_file):
        storage.remove(record_file)  # the old arrays' record; rewritten once the new ones are
    # StandardCheckpointer saves asynchronously; leaving the `with` block waits for the write
    # to be committed (the directory is renamed into place only when complete).
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, params, force=overwrite)
    integrity.write_record(record_file, params)
    if jax.process_index() == 0:
        with storage.open_file(storage.join(out_dir, CONFIG_FILE), "w") as f:
            f.write(model.cfg.to_json(indent=2, sort_keys=True))
            f.write("\n")
    return out_dir


def read_model_config(directory):
    path = storage.join(directory, CONFIG_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_FILE}; it is not a checkpoint written by save_orbax")
    try:
        with storage.open_file(path) as f:
            cfg = mc.config_from_json(f.read())
    except (ValueError, TypeError) as e:  # JSON syntax; a value of the wrong type
        raise ValueError(f"{path} is not a valid model config ({e}); restore it from the "
                         "checkpoint it came from") from e
    check_config(cfg, path)  # before anything is built from it
    return cfg


def load_orbax(directory, *, shardings=None, check_finite=False):
    """Reads a checkpoint written by `save_orbax`. Returns (model, params).

    shardings: None (every array on the default device), one `jax.sharding.Sharding` for
      all arrays, or a pytree of them matching params (e.g. from the logical axis rules).
    check_finite: refuse weights holding NaN or Inf (`NonFiniteWeightsError` naming the
      parameter paths), as `load_hf` does.
    Arrays keep the dtypes they were saved with; their checksums (`integrity.json`, when the
    checkpoint has one) are verified.
    """
    directory = storage.absolute(directory)
    cfg = read_model_config(directory)
    model = build_model(cfg)
    params_dir = storage.join(directory, PARAMS_DIR)
    if not storage.isdir(params_dir):
        raise FileNotFoundError(f"{directory} has {CONFIG_FILE} but no {PARAMS_DIR}/ checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(params_dir).item_metadata
        # A TreeMetadata (a Mapping over the saved tree, `.tree` the dict itself) in current
        # orbax; older versions return the tree of ArrayMetadata directly.
        stored = flax.traverse_util.flatten_dict(_plain_tree(getattr(stored, "tree", stored)))
        _check_structure(model, flax.traverse_util.unflatten_dict(stored), what=params_dir)
        flat_shardings = _flat_shardings(shardings, stored)
        target = {p: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=flat_shardings[p])
                  for p, m in stored.items()}
        try:
            params = ckptr.restore(params_dir, flax.traverse_util.unflatten_dict(target))
        except (ValueError, OSError, RuntimeError) as e:  # tensorstore: unreadable chunks
            raise integrity.IntegrityError(
                f"{params_dir}: orbax could not read the stored arrays ({type(e).__name__}: "
                f"{str(e)[:300]}); the checkpoint is damaged: write it again from its "
                "source (e.g. `mllm-jax convert hf-to-orbax`)") from e
    verify(params, directory)
    if check_finite:
        finite.check_finite(params, directory)
    return model, params


def verify(params, directory):
    """Raises `integrity.IntegrityError` naming each array of `params` (restored from
    `directory`) whose fingerprint differs from the directory's record."""
    rec = integrity.read_record(storage.join(directory, integrity.RECORD_FILE))
    if rec is None:
        return
    bad = integrity.mismatches(params, rec)
    if bad:
        raise integrity.IntegrityError(
            f"{storage.join(directory, PARAMS_DIR)}: {len(bad)} array(s) differ from what "
            f"was written ({storage.join(directory, integrity.RECORD_FILE)}): "
            f"{integrity.describe(bad)}. The checkpoint is damaged: write it again from its "
            "source (e.g. `mllm-jax convert hf-to-orbax`), or restore a copy")


def _plain_tree(tree):
    """orbax metadata trees are Mapping-like objects; flax's traversal wants dicts."""
    if hasattr(tree, "items") and not hasattr(tree, "shape"):
        return {k: _plain_tree(v) for k, v in tree.items()}
    return tree


def _flat_shardings(shardings, stored):
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return {p: device for p in stored}
    if isinstance(shardings, jax.sharding.Sharding):
        return {p: shardings for p in stored}
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(shardings))
    if set(flat) != set(stored):
        missing = sorted("/".join(p) for p in set(stored) - set(flat))
        raise ValueError(f"shardings do not cover the checkpoint's params: {abbreviate(missing)}")
    return flat


def _check_structure(model, params, what):
    """Raises naming every parameter path or shape that differs from what `model` needs."""
    flat = flax.traverse_util.flatten_dict(params)
    expected = flax.traverse_util.flatten_dict(abstract_params(model))
    problems = []
    missing = sorted("/".join(p) for p in set(expected) - set(flat))
    extra = sorted("/".join(p) for p in set(flat) - set(expected))
    if missing:
        problems.append(f"missing ({len(missing)}): {abbreviate(missing)}")
    if extra:
        problems.append(f"unexpected ({len(extra)}): {abbreviate(extra)}")
    shapes = [f"{'/'.join(p)}: {tuple(flat[p].shape)} vs {tuple(expected[p].shape)}"
              for p in expected if p in flat and tuple(flat[p].shape) != tuple(expected[p].shape)]
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {abbreviate(shapes)}")
    if problems:
        raise CheckpointMismatchError(
            f"{what} do not match the model config (scan_layers={model.cfg.scan_layers}):\n  "
            + "\n  ".join(problems))
