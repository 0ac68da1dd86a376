"""Meshes, the logical-axis rules tables (training, serving), and shardings for params,
state and batches.

Every parameter and the activations at block boundaries carry logical axis names; this file
alone maps them to the mesh axes `data`, `fsdp`, `tensor`. Changing parallelism is a change
of `mesh` sizes (or of `rules`) in the config, never of model code.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.experimental.mesh_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or None: replicated). First matching rule whose mesh axes are
# still free in the array's spec wins (flax semantics).
# Activations, the same in training and serving.
ACTIVATION_RULES: tuple[tuple[str, str | Sequence[str] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_vocab", "tensor"),
    ("activation_kv_heads", "tensor"),  # KV cache heads during generation
)

LOGICAL_RULES: tuple[tuple[str, str | Sequence[str] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("layers", None),
) + ACTIVATION_RULES

# Serving (generation, eval, chat). Training shards the embed dimension of every weight over
# fsdp and gathers each weight once per step, a cost a whole batch of sequences shares. A
# decode step reads every weight for one token per sequence: gathering them there would
# move the whole model across the interconnect for every token. So serving replicates the
# embed dimensions over data and fsdp (those axes split the batch only) and splits weights
# over tensor alone (heads, kv, mlp, vocab): each device multiplies by its own slice and
# only the activations, one token per sequence, are all-reduced. The KV cache's heads go
# over tensor with the attention heads that read them. Each device then holds 1/tensor of
# the weights: a model that does not fit so needs a larger tensor axis (or the training
# rules, which fit it and pay the gathers).
SERVING_RULES: tuple[tuple[str, str | Sequence[str] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", None),
    ("vision_embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("layers", None),
) + ACTIVATION_RULES

# The rules tables by the names the command line takes (`mllm-jax eval --rules`).
NAMED_RULES = {"serving": SERVING_RULES, "training": LOGICAL_RULES}


def named_rules(name: str):
    """The rules table called `name` in NAMED_RULES; a ValueError naming the choices."""
    if name not in NAMED_RULES:
        raise ValueError(f"rules {name!r} is not a rules table; use one of "
                         f"{', '.join(NAMED_RULES)}")
    return NAMED_RULES[name]


def mesh_config(data=-1, fsdp=1, tensor=1) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def mesh_sizes(cfg, num_devices: int) -> dict:
    """{axis: size} of a mesh config on `num_devices` devices (a -1 resolved); a ValueError
    naming the `mesh.*` fields and a setting that fits when the sizes do not fit."""
    sizes = {a: cfg[a] for a in MESH_AXES}
    shown = ", ".join(f"{a}={s}" for a, s in sizes.items())
    bad = [a for a, s in sizes.items()
           if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or (s < 1 and s != -1)]
    if bad:
        raise ValueError(f"mesh {shown}: mesh.{bad[0]} must be a positive integer or -1 "
                         "(all the devices the other axes leave)")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {shown}: at most one axis may be -1; set "
                         + " and ".join(f"mesh.{a}" for a in free[1:]) + " to a size")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if num_devices % known:
            fixed = [a for a in MESH_AXES if sizes[a] != -1 and sizes[a] != 1]
            divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
            product = " x ".join(f"mesh.{a}={sizes[a]}" for a in fixed)
            product += f" = {known}" if len(fixed) > 1 else ""
            raise ValueError(
                f"mesh {shown}: {product} does not divide the {num_devices} devices (mesh."
                f"{free[0]}=-1 takes the rest); use sizes whose product is one of "
                f"{', '.join(map(str, divisors))}")
        sizes[free[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh {shown} needs {known} devices, {num_devices} are available: make the "
            f"sizes multiply to {num_devices}, e.g. --config.mesh.data=-1 (all the devices "
            "the other axes leave)")
    return {a: int(s) for a, s in sizes.items()}


def make_mesh(cfg=None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 for "all the remaining devices"."""
    cfg = cfg if cfg is not None else mesh_config()
    devices = list(devices if devices is not None else jax.devices())
    sizes = list(mesh_sizes(cfg, len(devices)).values())
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(sizes, devices)
    except Exception:  # CPU / odd topologies: plain order is fine
        arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def rules_from(cfg=None):
    """The rules table, or the config's `rules` (list of [logical, mesh]) when given."""
    if cfg is not None and cfg.get("rules"):
        return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.rules)
    return LOGICAL_RULES


def param_specs(boxed_params, rules=LOGICAL_RULES):
    """PartitionSpecs for a tree of `nn.Partitioned`/`LogicallyPartitioned` leaves."""
    logical = nn.get_partition_spec(boxed_params)
    return nn.logical_to_mesh(logical, rules)


def param_shardings(boxed_params, mesh: Mesh, rules=LOGICAL_RULES):
    specs = param_specs(boxed_params, rules)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# The mesh axes that only store weights: they split the batch in computation, so every device
# needs a weight's slices from the others (see `matmul`).
STORAGE_AXES = ("data", "fsdp")

# XLA:TPU writes the reduce-scatter of a larger weight gradient, or of one scattered along
# its minor dimension, as an all-reduce and a slice (twice the bytes): `matmul` gathers a
# weight, and so reduce-scatters its gradient, in pieces of at most this many bytes
# (gathered), along the major dimension.
PIECE_BYTES = 16 << 20

# The names `matmul` gives the weights it gathers and the products it sums over the tensor
# axis, for remat policies that keep them (models.stack).
GATHERED_WEIGHT = "gathered_weight"
SUMMED_PRODUCT = "summed_product"


def matmul(x, w, axes: Sequence[str | None]):
    """`x @ w` for rows `x` [n, in] and a weight `w` [in, out] with logical axes `axes`
    (cast both to the compute dtype first: the gathers move half the bytes of float32).

    Under a mesh and rules whose storage axes (data, fsdp) split `w`, the product is written
    per device: each device takes its own rows (split over the storage axes), all-gathers
    `w` over the storage axes and keeps it split over the others (tensor): a column split
    gives output columns, a split of the contraction gives partial sums, added over those
    axes. The gradient of the gather is a reduce-scatter: each device's partial weight
    gradient (its own rows' contribution) lands on the slice of `w` it keeps, one collective
    of the weight's size. Left to sharding propagation, a scanned layer's weight gradient was
    all-reduced whole and then sliced: twice the bytes. The gathered weight is named
    GATHERED_WEIGHT so that a remat policy can keep it for the backward pass instead of
    gathering it again, and a sum over the tensor axis SUMMED_PRODUCT, so that the policies
    that keep matmul outputs keep it summed (models.stack).

    A plain `x @ w` outside a mesh, inside a shard_map, where no storage axis of size > 1
    splits `w` (e.g. under the serving rules), or where the rows do not divide over the
    storage axes."""
    plan = _split_plan(w, axes, x.shape[0])
    if plan is None:
        return jnp.dot(x, w)
    mesh, w_spec, gathers, summed = plan
    rows = tuple(a for a in STORAGE_AXES if a in mesh.shape)

    def local(x, w):
        if len(gathers) == 1:
            w = _gather_in_pieces(w, *gathers[0], mesh)
        else:
            for dim, names in gathers:
                w = jax.lax.all_gather(w, names, axis=dim, tiled=True)
        y = jnp.dot(x, checkpoint_name(w, GATHERED_WEIGHT))
        return checkpoint_name(jax.lax.psum(y, summed), SUMMED_PRODUCT) if summed else y

    x_spec = P(rows, _kept(w_spec[0]))
    y_spec = P(rows, _kept(w_spec[1]))
    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, w_spec), out_specs=y_spec)(x, w)


def _gather_in_pieces(w, dim: int, names, mesh):
    """`all_gather(w, names, axis=dim)` of a 2-D `w`, in pieces of at most PIECE_BYTES
    gathered (split along the other dimension, in multiples of 128 where it can). A gather
    along the minor dimension is written on the transpose, along the major one."""
    if dim == 1:
        return _gather_in_pieces(w.T, 0, names, mesh).T
    n = int(np.prod([mesh.shape[a] for a in _names(names)]))
    other = 1 - dim
    pieces = -(-w.size * n * w.dtype.itemsize // PIECE_BYTES)
    width = w.shape[other]
    step = -(-width // pieces)
    step = -(-step // 128) * 128 if width >= 128 * pieces else step
    if pieces <= 1 or step >= width:
        return jax.lax.all_gather(w, names, axis=dim, tiled=True)
    parts = [jax.lax.slice_in_dim(w, i, min(i + step, width), axis=other)
             for i in range(0, width, step)]
    return jnp.concatenate([jax.lax.all_gather(p, names, axis=dim, tiled=True)
                            for p in parts], axis=other)


def _names(entry) -> tuple:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _one(names: tuple):
    return None if not names else names[0] if len(names) == 1 else names


def _kept(entry):
    """A spec entry without the storage axes."""
    return _one(tuple(a for a in _names(entry) if a not in STORAGE_AXES))


def _split_plan(w, axes, num_rows: int):
    """(mesh, w's spec, [(dim, storage axes to gather it over)], the axes splitting the
    contraction) for `matmul`, or None where it is a plain product."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules or w.ndim != 2 or getattr(mesh, "manual_axes", ()):
        return None
    rows = [a for a in STORAGE_AXES if a in mesh.shape]
    if num_rows % int(np.prod([mesh.shape[a] for a in rows])):
        return None
    stored = tuple(nn.logical_to_mesh_axes(tuple(axes), rules))
    gathers = [(dim, _one(tuple(a for a in _names(entry) if a in STORAGE_AXES)))
               for dim, entry in enumerate(stored)]
    gathers = [(dim, names) for dim, names in gathers if names is not None]
    if not any(mesh.shape[a] > 1 for _, names in gathers for a in _names(names)):
        return None
    return mesh, P(*stored), gathers, _kept(stored[0])


def activation_rules_context(rules=LOGICAL_RULES):
    """Context in which `nn.with_logical_constraint` inside the models takes effect."""
    return nn.logical_axis_rules(rules)


def bytes_per_device(tree) -> dict:
    """{device: bytes} held by the addressable shards of the arrays in `tree`."""
    out = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
