"""Refusing parameters that hold NaN or Inf. The test runs where the arrays live: one
jitted reduction per array (per layer for layers stacked on a leading axis), so only a
boolean per array comes to the host, never the weights."""
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mllm_jax.convert import hf_keys


class NonFiniteWeightsError(ValueError):
    """Parameters hold NaN or Inf values (a damaged checkpoint or a diverged run)."""


@functools.partial(jax.jit, static_argnums=1)
def _all_finite(x, stacked: bool):
    """True where `x` holds no NaN/Inf: one bool, or one per layer of a stacked array."""
    return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)) if stacked else None)


def nonfinite_params(params) -> list:
    """[(parameter path, layer index or None)] of every array (every layer of a stacked
    array) holding a NaN or an Inf, in the order of the flattened tree."""
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(params))
    checked = [(p, hf_keys.is_scanned(p) and x.ndim > 0) for p, x in flat.items()
               if jnp.issubdtype(x.dtype, jnp.inexact)]
    # Compiled once per shape and dtype (and cached across calls); all dispatched before
    # the one transfer of the results.
    results = jax.device_get([_all_finite(flat[p], s) for p, s in checked])
    bad = []
    for (p, s), ok in zip(checked, results):
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
