"""`mllm-jax plan --decode BATCH LEN`: the generation programs of a config's model compiled
for a TPU topology with the serving rules (`sharding.SERVING_RULES`): the prefill of BATCH
prompts (an image each when the model takes images) into a KV cache of LEN slots, and one
decode step over that cache, which is donated and updated in place. Parameters are as the
config stores them (`model.param_dtype`); `dtype` is the compute and KV-cache dtype.

The mesh is data x tensor: the widest tensor axis every weight's split dimensions divide
(a decode step reads every weight for one token per sequence, so splitting them over more
chips divides the bytes each chip reads), the rest of the chips over the batch.
"""
import copy
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_jax import sharding
from mllm_jax.convert.hf_io import abstract_params
from mllm_jax.models import build_model, registry
from mllm_jax.plan.chips import chip_for
from mllm_jax.plan.train_plan import summarize, topology_devices

NEW_TOKENS = 128  # the prompts leave this many of the LEN slots for new tokens


def serving_tensor(model, devices, rules, batch: int) -> int:
    """The largest tensor-axis size that divides the device count, every split dimension of
    every weight and the KV cache's heads (else the cache would be gathered every step),
    and leaves a data axis dividing `batch`."""
    specs = sharding.param_specs(abstract_params(model, boxed=True), rules)
    shapes = abstract_params(model)
    leaves = list(zip(jax.tree_util.tree_leaves(shapes),
                      jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))))
    kv_heads = [x.shape[-3] for x in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda: model.init_cache(1, 8))) if x.ndim >= 4]
    n = len(devices)
    for t in sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True):
        if batch % (n // t) or any(h % t for h in kv_heads):
            continue
        if all(dim % t == 0 for leaf, spec in leaves
               for dim, axes in zip(leaf.shape, spec) if axes == "tensor"):
            return t
    return 1


def _put(tree, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def plan_decode(cfg, topology: str, batch: int, length: int, *, dtype="bfloat16",
                dump_hlo: str = "", rules=None, log=print) -> list:
    """[prefill plan, decode-step plan] (dicts, the training plan's fields plus the cache's)."""
    devices = topology_devices(topology)
    chip = chip_for(topology, devices[0].device_kind)
    rules = sharding.SERVING_RULES if rules is None else rules
    mcfg = copy.deepcopy(cfg.model)
    mcfg.dtype = dtype
    model = build_model(mcfg)
    if length <= NEW_TOKENS:
        raise ValueError(f"--decode length {length}: the cache must hold the prompt and "
                         f"{NEW_TOKENS} new tokens; use a length above {NEW_TOKENS}")
    prompt = length - NEW_TOKENS
    images = 1 if registry.is_multimodal(mcfg) else 0
    image_tokens = registry.tokens_per_image(mcfg) if images else 0
    if prompt <= image_tokens:
        raise ValueError(f"--decode length {length}: a prompt of {prompt} tokens cannot hold "
                         f"the image's {image_tokens} tokens; use a length above "
                         f"{image_tokens + NEW_TOKENS}")
    tensor = serving_tensor(model, devices, rules, batch)
    mesh = sharding.make_mesh(sharding.mesh_config(data=-1, fsdp=1, tensor=tensor), devices)
    param_sh = sharding.param_shardings(abstract_params(model, boxed=True), mesh, rules)
    params = _put(abstract_params(model), param_sh)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows)  # noqa: E731
    pix = None
    if images:
        v = mcfg.vision
        pix = jax.ShapeDtypeStruct((batch, v.image_size, v.image_size, v.num_channels),
                                   jnp.float32, sharding=rows)

    def traced(fn):
        def wrapped(*args):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
                    sharding.activation_rules_context(rules):
                return fn(*args)
        return wrapped

    def prefill(p, ids, mask, pixels):
        cache = model.init_cache(batch, length)
        return model.apply({"params": p}, ids, mask, cache, pixels, method="prefill")

    def decode_step(p, tok, pos, kv_mask, cache):
        return model.apply({"params": p}, tok, pos, kv_mask, cache, method="decode_step")

    common = {"topology": topology, "chip": chip.name, "devices": len(devices),
              "mesh": {k: int(v) for k, v in mesh.shape.items()}, "rules": "serving"
              if rules is sharding.SERVING_RULES else "custom", "batch": batch,
              "cache_len": length, "prompt_len": prompt, "dtype": dtype,
              "param_dtype": str(mcfg.get("param_dtype") or "float32")}
    t0 = time.perf_counter()
    pre = jax.jit(traced(prefill)).lower(params, ints(batch, prompt), ints(batch, prompt),
                                         pix).compile()
    pre_s = time.perf_counter() - t0
    cache_sh = pre.output_shardings[1]
    cache = _put(jax.eval_shape(lambda: model.init_cache(batch, length)), cache_sh)
    t0 = time.perf_counter()
    step = jax.jit(traced(decode_step), donate_argnums=(4,)).lower(
        params, ints(batch), ints(batch), ints(batch, length), cache).compile()
    step_s = time.perf_counter() - t0
    log(f"plan: generation programs compiled for {topology}, mesh {dict(mesh.shape)}")
    out = []
    for name, compiled, seconds in (("prefill", pre, pre_s), ("decode_step", step, step_s)):
        if dump_hlo:
            import os
            os.makedirs(dump_hlo, exist_ok=True)
            with open(os.path.join(dump_hlo, f"{name}.hlo.txt"), "w") as f:
                f.write(compiled.as_text())
        plan = {"program": name, "compiles": True, **common, "compile_s": round(seconds, 1)}
        plan.update(summarize(compiled, len(devices), chip, 0.0))
        out.append(plan)
    cache_leaves = jax.tree_util.tree_leaves(cache)
    per_device = sum(_shard_bytes(x) for x in cache_leaves)
    kv = [x for x in cache_leaves if x.ndim >= 4]
    dstep = out[1]
    dstep.update({
        "kv_cache_dtype": str(kv[0].dtype) if kv else None,
        "kv_cache_bytes_per_device": int(per_device),
        "weight_bytes_per_device": int(sum(_shard_bytes(x) for x in
                                           jax.tree_util.tree_leaves(params))),
        "weight_all_gather_bytes_per_device": int(
            dstep["collective_bytes_per_device"].get("all-gather", 0)),
        "cache_donated": dstep["memory_detail"]["aliased"] >= per_device,
    })
    read = dstep["kv_cache_bytes_per_device"] + dstep["weight_bytes_per_device"]
    dstep["hbm_floor_s"] = read / chip.hbm_bytes_per_s
    return out


def _shard_bytes(x) -> float:
    shape = x.sharding.shard_shape(x.shape)
    return float(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
