"""Trainable / frozen parameter trees chosen by regexes over '/'-joined parameter paths.

Gradients are taken with respect to the trainable tree only; the frozen tree is an ordinary
(non-differentiated) input, gets no optimizer state, and may be stored in a lower precision.
"""
import re

import flax
import jax
import jax.numpy as jnp


def path_str(path) -> str:
    return "/".join(str(p) for p in path)


def compile_patterns(patterns, field: str = "stage.trainable", suffix: str = "") -> list:
    """The compiled regexes of a list of patterns; a ValueError naming the config field
    and the pattern when one is not a valid regular expression (or the list is a string)."""
    if isinstance(patterns, str):
        raise ValueError(f"{field} = {patterns!r}: must be a list of regular expressions, "
                         f"e.g. [{patterns!r}]")
    out = []
    for i, p in enumerate(patterns):
        try:
            out.append(re.compile(p))
        except (re.error, TypeError) as e:
            raise ValueError(f"{field}[{i}]{suffix} = {p!r} is not a valid regular expression: "
                             f"{e}") from None
    return out


def is_trainable(path, patterns) -> bool:
    s = path_str(path)
    return any(re.search(p, s) for p in patterns)


def split(params, patterns):
    """(trainable, frozen): two nested dicts that together hold every leaf of `params`.
    patterns: regexes (`stage.trainable`) searched in the '/'-joined paths."""
    flat = flax.traverse_util.flatten_dict(params)
    compiled = compile_patterns(patterns)
    train = {k: v for k, v in flat.items() if is_trainable(k, compiled)}
    frozen = {k: v for k, v in flat.items() if k not in train}
    if not train:
        raise ValueError(f"no parameter path matches the trainable patterns {list(patterns)}; "
                         f"paths look like {path_str(next(iter(flat)))!r}")
    return (flax.traverse_util.unflatten_dict(train), flax.traverse_util.unflatten_dict(frozen))


def paths(tree) -> list[str]:
    """The '/'-joined paths of a tree's leaves."""
    return [path_str(k) for k in flax.traverse_util.flatten_dict(tree)]


def merge(trainable, frozen):
    flat = dict(flax.traverse_util.flatten_dict(frozen))
    flat.update(flax.traverse_util.flatten_dict(trainable))
    return flax.traverse_util.unflatten_dict(flat)


def cast_floating(tree, dtype):
    """Casts floating leaves (e.g. frozen towers to bfloat16)."""
    if dtype is None:
        return tree
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
