"""The model owns its KV cache: a scanned decoder's decode step updates the stacked cache in
place (the cache is the scan's carry, each layer writes only its new slots), so the compiled
step's temporary memory stays below the cache's size instead of holding another copy."""
import flax.linen as nn
import jax
import jax.numpy as jnp

import mllm_jax
from mllm_jax import models, presets


def _decode_memory(cfg, batch, max_len):
    model = mllm_jax.build_model(cfg)
    params = jax.eval_shape(lambda: nn.meta.unbox(
        model.init(jax.random.PRNGKey(0), *models.init_inputs(cfg))["params"]))
    cache = jax.eval_shape(lambda: model.init_cache(batch, max_len))
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))
    step = jax.jit(lambda p, tok, pos, kv, c: model.apply({"params": p}, tok, pos, kv, c,
                                                          method="decode_step"),
                   donate_argnums=(4,))
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    stats = step.lower(params, ints(batch), ints(batch), ints(batch, max_len),
                       cache).compile().memory_analysis()
    return stats, cache_bytes


def test_scanned_decode_step_updates_the_cache_in_place():
    for preset in ("tiny-llama", "tiny-llava"):
        cfg = presets.get(preset)
        cfg.scan_layers = True
        cfg.text.num_hidden_layers = 4
        stats, cache_bytes = _decode_memory(cfg, batch=8, max_len=512)
        assert stats.alias_size_in_bytes == cache_bytes  # the donated cache is the output
        # One layer's slice may be read out; a full copy of the cache may not.
        assert stats.temp_size_in_bytes < cache_bytes / 2, (preset, stats, cache_bytes)


def test_the_decode_loop_holds_no_model_code():
    """infer/ loops, samples and searches; layers, attention, RoPE and parameter paths are
    the model's (its prefill / decode_step), so a new decoder is never written twice."""
    import ast
    import pathlib

    forbidden = ("mllm_jax.models.attention", "mllm_jax.models.rope", "mllm_jax.models.layers",
                 "mllm_jax.models.stack", "mllm_jax.models.decoders", "mllm_jax.models.encoders",
                 "mllm_jax.models.vit")
    infer = pathlib.Path(mllm_jax.__file__).parent / "infer"
    for path in infer.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                assert not any(n.startswith(forbidden) for n in names), (path.name, names)
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                # parameter-tree paths of a family
                assert node.value not in ("language_model", "layers", "model"), (
                    path.name, node.value)


def test_a_concrete_cache_can_be_donated_to_the_decode_step():
    """Each cache array is its own buffer: a jitted decode step may donate the cache it is
    given (a shared zero buffer would be 'donated twice')."""
    import numpy as np
    for scan in (False, True):
        cfg = presets.get("tiny-llama")
        cfg.scan_layers = scan
        model = mllm_jax.build_model(cfg)
        params = model.init(jax.random.PRNGKey(0), *models.init_inputs(cfg))["params"]
        step = jax.jit(lambda p, tok, pos, kv, c: model.apply({"params": p}, tok, pos, kv, c,
                                                              method="decode_step"),
                       donate_argnums=(4,))
        cache = model.init_cache(2, 8)
        tok, pos, kv = jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32), jnp.ones((2, 8),
                                                                                        jnp.int32)
        logits, cache = step(params, tok, pos, kv, cache)
        logits, cache = step(params, tok, pos + 1, kv, cache)
        assert np.all(np.isfinite(np.asarray(logits))) and int(cache["index"]) == 2
