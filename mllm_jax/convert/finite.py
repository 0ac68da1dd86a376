"""Refusing parameters that hold NaN or Inf. The test runs where the arrays live: one
jitted reduction per array (per layer for layers stacked on a leading axis), so only a
boolean per array comes to the host, never the weights."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.convert import hf_keys


class NonFiniteWeightsError(ValueError):
    """Parameters hold NaN or Inf values (a damaged checkpoint or a diverged run)."""


def nonfinite_params(params) -> list:
    """[(parameter path, layer index or None)] of every array (every layer of a stacked
    array) holding a NaN or an Inf, in the order of the flattened tree."""
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(params))
    paths = [p for p, x in flat.items() if jnp.issubdtype(x.dtype, jnp.inexact)]
    stacked = [hf_keys.is_scanned(p) and flat[p].ndim > 0 for p in paths]

    @jax.jit
    def finite(leaves):
        return [jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)) if s else None)
                for x, s in zip(leaves, stacked)]

    bad = []
    for p, s, ok in zip(paths, stacked, jax.device_get(finite([flat[p] for p in paths]))):
        if s:
            bad.extend((p, int(i)) for i in range(len(ok)) if not ok[i])
        elif not ok:
            bad.append((p, None))
    return bad


def check_finite(params, source, describe=None) -> None:
    """Raises NonFiniteWeightsError naming `source` and the first few parameters holding
    NaN or Inf (with their count). `describe((path, layer))` names one (default: the
    parameter path, with the layer of a stacked array)."""
    bad = nonfinite_params(params)
    if not bad:
        return
    describe = describe or (lambda item: "/".join(item[0]) + (
        "" if item[1] is None else f" [layer {item[1]}]"))
    names = [describe(item) for item in bad[:5]]
    more = f", ... (+{len(bad) - 5} more)" if len(bad) > 5 else ""
    raise NonFiniteWeightsError(
        f"{source}: {len(bad)} parameter array(s) hold NaN or Inf values: "
        f"{', '.join(names)}{more}; the checkpoint is damaged (restore or re-export it), or "
        "comes from a run that diverged")
