"""A stack of identical blocks, either unrolled (`layers_0`, `layers_1`, ...) or scanned
(one `layers` subtree whose leaves carry a leading layer axis), with optional remat.

The parent owns the block parameters directly (`nn.share_scope`), so paths read
`model/layers_3/self_attn/...` (unrolled) or `model/layers/self_attn/...` (scanned).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.sharding import GATHERED_WEIGHT, SUMMED_PRODUCT

_policies = jax.checkpoint_policies
# The policies that keep matmul outputs keep a product split over the tensor axis summed
# (`sharding.matmul`): else the backward pass would sum it over the devices again.
_BASE_POLICIES = {
    "full": _policies.nothing_saveable,
    "dots": _policies.save_from_both_policies(
        _policies.checkpoint_dots, _policies.save_only_these_names(SUMMED_PRODUCT)),
    "dots_no_batch": _policies.save_from_both_policies(
        _policies.checkpoint_dots_with_no_batch_dims,
        _policies.save_only_these_names(SUMMED_PRODUCT)),
}
# "<policy>+weights" also keeps each layer's weights as gathered for its matmuls
# (`sharding.matmul`) from the forward pass to the backward pass: with weights split
# over fsdp, the backward pass then gathers none of them again, for the memory of every
# layer's gathered compute-dtype weights (their size / the tensor axis, per device).
REMAT_POLICIES = {
    "none": None,
    **_BASE_POLICIES,
    **{f"{name}+weights": _policies.save_from_both_policies(
        policy, _policies.save_only_these_names(GATHERED_WEIGHT))
       for name, policy in _BASE_POLICIES.items()},
}


def remat_block(block_cls, policy_name: str):
    if policy_name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {policy_name!r}; known: {sorted(REMAT_POLICIES)}")
    if policy_name == "none":
        return block_cls
    return nn.remat(block_cls, policy=REMAT_POLICIES[policy_name], prevent_cse=True)


class _ScanBody(nn.Module):
    """`block(x, *args) -> x` in the `(carry, y)` form of `nn.scan`; y is the block output
    when `collect` is set, so callers can pick intermediate layers. With `cached`, the carry
    is (x, cache): the whole stacked KV cache with the current `layer` index, which each
    block updates in place (see `attention.write_kv_cache`)."""

    block_cls: Any
    block_kwargs: Any
    collect: bool
    cached: bool = False
    prefill: bool = False

    def setup(self):
        self.block = self.block_cls(**self.block_kwargs)
        nn.share_scope(self, self.block)

    def __call__(self, carry, *args):
        if self.cached:
            x, cache = carry
            x, cache = self.block(x, *args, cache=cache, prefill=self.prefill)
            return (x, {**cache, "layer": cache["layer"] + 1}), None
        x = self.block(carry, *args)
        return x, (x if self.collect else None)


class LayerStack(nn.Module):
    """Returns (x, [output of each layer] if collect else None); with a KV `cache`
    (the decoder's: per-layer lists when unrolled, stacked on a leading layer axis when
    scanned; see `models.llm.init_cache`) returns (x, updated cache). The blocks take
    `cache=` and `prefill=` keywords and return (x, cache) when given a cache."""

    block_cls: Any
    block_kwargs: Any
    num_layers: int
    num_args: int
    scan: bool = False
    remat_policy: str = "none"
    collect: bool = False

    @nn.compact
    def __call__(self, x, *args, cache=None, prefill=False):
        # Rematerialization only pays in a backward pass; decoding with a cache has none.
        block_cls = remat_block(self.block_cls, self.remat_policy if cache is None else "none")
        if not self.scan:
            outs, ks, vs = [], [], []
            for i in range(self.num_layers):
                block = block_cls(**self.block_kwargs, name=f"layers_{i}")
                if cache is None:
                    x = block(x, *args)
                    outs.append(x)
                    continue
                layer = {"k": cache["k"][i], "v": cache["v"][i], "index": cache["index"]}
                x, layer = block(x, *args, cache=layer, prefill=prefill)
                ks.append(layer["k"])
                vs.append(layer["v"])
            if cache is not None:
                return x, {**cache, "k": ks, "v": vs}
            return x, (outs if self.collect else None)
        scanned = nn.scan(
            _ScanBody,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * self.num_args,
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        if cache is not None:
            carry = (x, {**cache, "layer": jnp.zeros((), jnp.int32)})
            (x, cache), _ = scanned(block_cls, self.block_kwargs, False, True, prefill,
                                    name="layers")(carry, *args)
            cache = dict(cache)
            del cache["layer"]
            return x, cache
        x, ys = scanned(block_cls, self.block_kwargs, self.collect, name="layers")(x, *args)
        return x, ([ys[i] for i in range(self.num_layers)] if self.collect else None)
