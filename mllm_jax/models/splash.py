"""Causal self-attention by Pallas splash attention (TPU), for whole sequences: training and
prefill. Cached decoding (one query over a KV cache) stays on the XLA path.

`model.attention` selects the implementation: "xla" (default: `attention.causal_self_attention`
with a dense boolean mask), "splash" (this kernel; needs a TPU), "auto" (splash when the
computation runs on TPU, XLA elsewhere), "splash_interpret" (the kernel run by the Pallas
interpreter on any backend: slow, for tests).

The kernel takes no dense mask: tokens attend causally within their segment. Packed rows
bring their `segment_ids`; padding (`attention_mask` 0) becomes a segment of its own, so a
padding query attends to earlier padding instead of to nothing (its output is never used)
and no softmax row is empty. The XLA path's outputs at real tokens are the same.
"""
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec as P

IMPLEMENTATIONS = ("xla", "splash", "auto", "splash_interpret")
LANES = 128  # the kernel's key blocks are multiples of this; sequences are padded to it
BLOCK_SIZE = 512  # the largest block tried (of 512, 256, 128) that divides the padded length


@flax.struct.dataclass
class SegmentMask:
    """What `causal_attention` takes instead of a dense mask: segment ids [b, s] (padding
    already a segment of its own, see `segment_mask`) and the static kernel settings."""

    ids: jax.Array
    sliding_window: int | None = flax.struct.field(pytree_node=False, default=None)
    interpret: bool = flax.struct.field(pytree_node=False, default=False)


def resolve(name: str) -> str:
    """The implementation "xla", "splash" or "splash_interpret" that `model.attention` value
    `name` selects for the computation being traced ("auto": splash on TPU, else XLA)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention = {name!r} is not one of {list(IMPLEMENTATIONS)}")
    if name in ("xla", "splash_interpret"):
        return name
    platform = _platform(_current_mesh())
    if name == "auto":
        return "splash" if platform == "tpu" else "xla"
    if platform != "tpu":
        raise ValueError(
            f"model.attention = 'splash' runs a Pallas TPU kernel, but this computation runs "
            f"on {platform}: set model.attention to 'auto' (splash on TPU, XLA elsewhere) or "
            "'xla' (or 'splash_interpret' to run the kernel in the Pallas interpreter, slowly)")
    return name


def segment_mask(seq: int, attention_mask=None, segment_ids=None, *, sliding_window=None,
                 interpret: bool = False) -> SegmentMask:
    """The kernel's mask for causal self-attention over sequences of `seq` tokens.

    attention_mask: [b, s], 1 for real tokens, 0 for padding (either side); segment_ids:
    [b, s] ints of packed rows. Real tokens keep their segment id (0 without segment_ids:
    ids [1, s], the same for every row); padding gets one id below every real one, so it is
    a segment of its own.
    """
    ids = (jnp.zeros((1, seq), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    if attention_mask is not None:
        pad_id = jnp.minimum(jnp.min(ids), 0) - 1
        ids = jnp.where(attention_mask.astype(bool), ids, pad_id)
    return SegmentMask(ids, sliding_window=sliding_window, interpret=interpret)


def causal_attention(q, k, v, mask: SegmentMask, scale: float, block_size: int = BLOCK_SIZE):
    """Causal self-attention within segments: q [b, s, h, d], k, v [b, s, kv_heads, d]
    (grouped-query heads when kv_heads < h) -> [b, s, h, d] in v's dtype.

    The kernel does not scale scores, so q is scaled here. The sequence is padded to a
    multiple of 128 (the padding its own segment) and sliced back. Under a mesh the kernel
    runs per device (`jax.shard_map`): rows split as `activation_batch`, heads as
    `activation_kv_heads` in the logical-axis rules, when they divide evenly.
    """
    b, s, h, d = q.shape
    if k.shape[1] != s:
        raise ValueError(f"splash attention is self-attention: {s} queries but "
                         f"{k.shape[1]} keys; cached decoding uses attention.cached_attention")
    length = -(-s // LANES) * LANES
    block = next(x for x in (block_size, block_size // 2, block_size // 4, LANES)
                 if x >= LANES and length % x == 0)
    ids = jnp.broadcast_to(mask.ids, (b, s))
    ids = jnp.concatenate([ids, jnp.full((b, length - s), jnp.min(ids) - 1, jnp.int32)], 1)

    def heads_major(x):  # [b, s, n, d] -> [b, n, length, d]
        return jnp.pad(x, ((0, 0), (0, length - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    # In bf16 this rounds q * scale once (the XLA path scales the float32 scores instead).
    q = (q.astype(jnp.float32) * jnp.float32(scale)).astype(q.dtype)
    run = _kernel_runner(length, block, mask.sliding_window, mask.interpret)
    out = _per_device(run, heads_major(q), heads_major(k), heads_major(v), ids)
    return out.transpose(0, 2, 1, 3)[:, :s].astype(v.dtype)


def _kernel_runner(length: int, block: int, sliding_window, interpret: bool):
    """fn(q [b, h, L, d], k, v [b, kv_heads, L, d], ids [b, L]) on one device's arrays."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    def run(q, k, v, ids):
        shape = (length, length)
        one = (sa.CausalMask(shape) if sliding_window is None or sliding_window >= length
               # HF keeps keys with q - k < window: window - 1 to the left, none to the right.
               else sa.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0))
        sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block,
                              block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
        kernel = sa.make_splash_mha(sa.MultiHeadMask([one] * q.shape[1]), block_sizes=sizes,
                                    head_shards=1, q_seq_shards=1, interpret=interpret)
        return jax.vmap(lambda q, k, v, i: kernel(q, k, v, segment_ids=sa.SegmentIds(i, i)))(
            q, k, v, ids)
    return run


def _per_device(run, q, k, v, ids):
    """`run` on each device's rows and heads under the current mesh, or directly."""
    mesh = _current_mesh()
    if mesh is None:
        return run(q, k, v, ids)
    free = [a for a in mesh.axis_names if a not in _manual_axes(mesh)]
    if not free:  # already inside a shard_map over every axis: arrays are per device
        return run(q, k, v, ids)
    rows = _mesh_axes("activation_batch", q.shape[0], mesh, free)
    heads = _mesh_axes("activation_kv_heads", k.shape[1], mesh, free)
    if heads is not None and q.shape[1] % _size(mesh, heads):
        heads = None
    qkv = P(rows, heads, None, None)
    return jax.shard_map(run, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows, None)),
                         out_specs=qkv, axis_names=set(free), check_vma=False)(q, k, v, ids)


def _mesh_axes(logical: str, size: int, mesh, free):
    """The mesh axes the rules map `logical` to, if they split `size` evenly, else None."""
    from mllm_jax import sharding

    rules = nn.get_logical_axis_rules() or sharding.LOGICAL_RULES
    axes = nn.logical_to_mesh_axes((logical,), rules)[0]
    if axes is None:
        return None
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in free)
    if not axes or size % _size(mesh, axes):
        return None
    return axes


def _size(mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def _current_mesh():
    """The mesh of `jax.set_mesh` / `jax.sharding.use_abstract_mesh`, or of a (deprecated)
    `with mesh:` block, which sets no abstract mesh; None outside any mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return mesh
    from jax._src import mesh as mesh_lib  # where `with mesh:` records its mesh

    legacy = mesh_lib.thread_resources.env.physical_mesh
    return None if legacy.empty else legacy


def _manual_axes(mesh) -> frozenset:
    return frozenset(getattr(mesh, "manual_axes", ()) if isinstance(mesh, AbstractMesh) else ())


def _platform(mesh) -> str:
    """The platform the traced computation is compiled for: the mesh's devices' (which may
    be a TPU topology compiled ahead of time on a CPU host), else the default backend."""
    if isinstance(mesh, AbstractMesh):
        device = mesh.abstract_device
        return device.platform if device is not None else jax.default_backend()
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()
