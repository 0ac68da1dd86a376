"""A stack of identical blocks, either unrolled (`layers_0`, `layers_1`, ...) or scanned
(one `layers` subtree whose leaves carry a leading layer axis), with optional remat.

The parent owns the block parameters directly (`nn.share_scope`), so paths read
`model/layers_3/self_attn/...` (unrolled) or `model/layers/self_attn/...` (scanned).
"""
from typing import Any

import flax.linen as nn
import jax

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _remat(block_cls, policy_name: str):
    if policy_name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {policy_name!r}; known: {sorted(REMAT_POLICIES)}")
    if policy_name == "none":
        return block_cls
    return nn.remat(block_cls, policy=REMAT_POLICIES[policy_name], prevent_cse=True)


class _ScanBody(nn.Module):
    """`block(x, *args) -> x` in the `(carry, y)` form of `nn.scan`; y is the block output
    when `collect` is set, so callers can pick intermediate layers."""

    block_cls: Any
    block_kwargs: Any
    collect: bool

    def setup(self):
        self.block = self.block_cls(**self.block_kwargs)
        nn.share_scope(self, self.block)

    def __call__(self, x, *args):
        x = self.block(x, *args)
        return x, (x if self.collect else None)


class LayerStack(nn.Module):
    """Returns (x, [output of each layer] if collect else None)."""

    block_cls: Any
    block_kwargs: Any
    num_layers: int
    num_args: int
    scan: bool = False
    remat_policy: str = "none"
    collect: bool = False

    @nn.compact
    def __call__(self, x, *args):
        block_cls = _remat(self.block_cls, self.remat_policy)
        if not self.scan:
            outs = []
            for i in range(self.num_layers):
                x = block_cls(**self.block_kwargs, name=f"layers_{i}")(x, *args)
                outs.append(x)
            return x, (outs if self.collect else None)
        scanned = nn.scan(
            _ScanBody,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * self.num_args,
            length=self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, ys = scanned(block_cls, self.block_kwargs, self.collect, name="layers")(x, *args)
        return x, ([ys[i] for i in range(self.num_layers)] if self.collect else None)
