"""Pallas splash attention (`model.attention` "splash" on TPU) equals the XLA path.

On CPU the kernel runs in the Pallas interpreter ("splash_interpret"). Each comparison is
against the independent XLA implementation (`attention.dot_product_attention` with a dense
mask, or the whole model with `attention="xla"`): outputs at real (non-padding) queries and
the gradients of a loss that reads only those outputs. Padding queries attend differently
(the kernel gives padding a segment of its own; the XLA path masks keys only), so their
outputs are only required to be finite.

Tolerance: max |splash - xla| / max |xla| <= 1e-5 in float32 (measured 2e-7 to 1e-6); run
with -s to see the measured errors.
"""
import importlib.util
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mllm_jax
from mllm_jax import presets, sharding
from mllm_jax import config as mc
from mllm_jax.models import attention, splash
from mllm_jax.models.decoders.opt import opt_text_config
from tpu_script import run_tpu_script

RTOL = 1e-5


def _rel_err(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(ours).all(), f"{what}: non-finite values"
    scale = float(np.abs(ref).max())
    assert scale > 0, f"{what}: the reference is all zeros, the comparison would prove nothing"
    err = float(np.abs(ours - ref).max()) / scale
    print(f"{what}: max |splash - xla| / max |xla| = {err:.1e}")
    assert err <= RTOL, f"{what}: relative error {err:.2e} > {RTOL}"
    return err


def _padding(lengths, seq, left=()):
    """attention_mask [b, seq]: the first `n` tokens real (the last `n` for rows in left)."""
    rows = [np.arange(seq) >= seq - n if i in left else np.arange(seq) < n
            for i, n in enumerate(lengths)]
    return jnp.asarray(np.stack(rows), jnp.int32)


def _packed(segments, seq):
    """segment_ids [b, seq]: rows of consecutive segments 1, 2, ... and 0 after them, with
    the attention_mask that marks that tail as padding."""
    ids = np.zeros((len(segments), seq), np.int32)
    for i, lengths in enumerate(segments):
        ids[i, :sum(lengths)] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    return jnp.asarray(ids), jnp.asarray(ids > 0, jnp.int32)


# (batch, seq, heads, kv_heads, head_dim, mask kwargs, sliding window)
CASES = {
    "causal": lambda: (2, 256, 4, 1, 128, {}, None),
    # row 0 right padded (training), row 1 left padded (a prompt at prefill: its first
    # queries see no key at all on the XLA path); 200 is not a multiple of the kernel block
    "causal+padding": lambda: (2, 200, 4, 2, 64,
                               {"attention_mask": _padding([150, 120], 200, left=(1,))}, None),
    "segments": lambda: (2, 256, 4, 2, 64, dict(zip(
        ("segment_ids", "attention_mask"), _packed([[100, 90, 66], [30, 170]], 256))), None),
    "sliding_window+padding": lambda: (2, 256, 4, 2, 64,
                                       {"attention_mask": _padding([256, 180], 256)}, 100),
}


def _inputs(b, s, h, kvh, d, seed=0):
    r = np.random.RandomState(seed)
    return [jnp.asarray(r.randn(b, s, n, d), jnp.float32) for n in (h, kvh, kvh, h)]


def _out_and_grads(fn, q, k, v, w):
    """fn's output and the gradients w.r.t. q, k, v of sum(out * w), in one program."""
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(w.astype(out.dtype))


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_xla_path_forward_and_gradients(case):
    b, s, h, kvh, d, masks, window = CASES[case]()
    q, k, v, w = _inputs(b, s, h, kvh, d)
    real = masks.get("attention_mask", jnp.ones((b, s), jnp.int32))[:, :, None, None]
    w = w * real  # the loss reads the outputs of real queries only
    scale = d ** -0.5
    dense = attention.make_attention_mask(s, causal=True, sliding_window=window, **masks)
    segments = splash.segment_mask(s, masks.get("attention_mask"), masks.get("segment_ids"),
                                   sliding_window=window, interpret=True)

    ref, ref_grads = jax.jit(lambda q, k, v, w: _out_and_grads(
        lambda *a: attention.dot_product_attention(*a, dense, scale), q, k, v, w))(q, k, v, w)
    out, grads = jax.jit(lambda q, k, v, w: _out_and_grads(
        lambda *a: splash.causal_attention(*a, segments, scale, block_size=128),
        q, k, v, w))(q, k, v, w)

    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert np.isfinite(np.asarray(out)).all()  # padding queries too
    _rel_err(out * real, ref * real, f"{case} output")
    for name, ours, theirs in zip("qkv", grads, ref_grads):
        _rel_err(ours, theirs, f"{case} d{name}")


def test_packed_segments_do_not_see_each_other():
    """A guard on the comparison above: the kernel's output for a segment does not change
    when another segment's values do."""
    b, s, h, kvh, d = 1, 256, 2, 1, 64
    q, k, v, _ = _inputs(b, s, h, kvh, d, seed=1)
    ids, real = _packed([[128, 128]], s)
    segments = splash.segment_mask(s, real, ids, interpret=True)
    run = jax.jit(lambda v: splash.causal_attention(q, k, v, segments, d ** -0.5,
                                                    block_size=128))
    first, changed = run(v), run(v.at[:, 128:].multiply(-3.0))
    np.testing.assert_array_equal(first[:, :128], changed[:, :128])
    assert not np.allclose(first[:, 128:], changed[:, 128:])


@pytest.mark.filterwarnings("ignore:.*context manager has been deprecated:DeprecationWarning")
@pytest.mark.parametrize("enter", ["set_mesh", "with_mesh"])
def test_kernel_under_a_mesh_runs_per_device_and_equals_xla_path(enter):
    """Under a (data 2, fsdp 2, tensor 2) mesh the kernel runs in a shard_map over the batch
    (data, fsdp) and heads (tensor); `with mesh:` is how the trainer enters its mesh."""
    mesh = sharding.make_mesh(sharding.mesh_config(data=2, fsdp=2, tensor=2))
    b, s, h, kvh, d = 4, 130, 4, 2, 64
    q, k, v, w = _inputs(b, s, h, kvh, d, seed=2)
    mask = _padding([130, 100, 64, 1], s)
    real = mask[:, :, None, None]
    w = w * real
    scale = d ** -0.5
    dense = attention.make_attention_mask(s, causal=True, attention_mask=mask)
    ref, ref_grads = jax.jit(lambda q, k, v, w: _out_and_grads(
        lambda *a: attention.dot_product_attention(*a, dense, scale), q, k, v, w))(q, k, v, w)

    heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        ("data", "fsdp"), None, "tensor", None))
    q, k, v, w = (jax.device_put(x, heads) for x in (q, k, v, w))

    def run(q, k, v, w, mask):
        segments = splash.segment_mask(s, mask, interpret=True)
        return _out_and_grads(lambda *a: splash.causal_attention(*a, segments, scale,
                                                                 block_size=128), q, k, v, w)
    context = jax.set_mesh(mesh) if enter == "set_mesh" else mesh
    with context, sharding.activation_rules_context():
        assert "shard_map" in str(jax.make_jaxpr(run)(q, k, v, w, mask))
        out, grads = jax.jit(run)(q, k, v, w, mask)
    _rel_err(out * real, ref * real, f"mesh ({enter}) output")
    for name, ours, theirs in zip("qkv", grads, ref_grads):
        _rel_err(ours, theirs, f"mesh ({enter}) d{name}")


def _tiny_opt():
    return mc.llm_config(opt_text_config(vocab_size=256, hidden_size=64, ffn_dim=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=64))


MODELS = {  # name -> (config, scan_layers, remat_policy)
    "llama": (lambda: presets.get("tiny-llama"), False, "none"),
    "llama-scanned-remat": (lambda: presets.get("tiny-llama"), True, "full"),
    "mistral-window": (lambda: presets.get("tiny-mistral"), False, "none"),  # window 8
    "opt-scanned": (_tiny_opt, True, "none"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_logits_and_gradients_equal_with_splash(name):
    """A whole tiny decoder with attention "splash_interpret" against "xla": logits at the
    real tokens of right-padded packed rows and the parameter gradients of a loss on them."""
    make, scan, remat = MODELS[name]
    b, s = 2, 40
    r = np.random.RandomState(3)
    ids = jnp.asarray(r.randint(3, 250, (b, s)))
    segment_ids, mask = _packed([[12, 18], [10, 15, 11]], s)
    w = jnp.asarray(r.randn(b, s, 256), jnp.float32) * mask[..., None]

    def loss_and_grads(attention_impl, params):
        cfg = make()
        cfg.update(scan_layers=scan, remat_policy=remat, attention=attention_impl)
        model = mllm_jax.build_model(cfg)

        def loss(p):
            logits = model.apply({"params": p}, ids, attention_mask=mask,
                                 segment_ids=segment_ids)
            return jnp.sum(logits * w), logits
        return jax.grad(loss, has_aux=True)(params)[::-1]

    cfg = make()
    cfg.update(scan_layers=scan, remat_policy=remat)
    params = jax.jit(mllm_jax.build_model(cfg).init)(jax.random.PRNGKey(0), ids)["params"]
    ref_logits, ref_grads = jax.jit(lambda p: loss_and_grads("xla", p))(params)
    logits, grads = jax.jit(lambda p: loss_and_grads("splash_interpret", p))(params)
    real = np.asarray(mask, bool)
    _rel_err(np.asarray(logits)[real], np.asarray(ref_logits)[real], f"{name} logits")
    # Relative to the largest gradient of the tree: some are zero up to rounding (the key
    # projection's bias, which shifts every score of a row equally).
    flat, ref_flat = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)])
                      for g in (grads, ref_grads))
    _rel_err(flat, ref_flat, f"{name} parameter gradients")


def test_prefill_with_splash_equals_xla():
    """Prefill of a left-padded prompt through the kernel fills the same KV cache and gives
    the same next-token logits; the decode step after it (XLA over the cache) agrees too."""
    s, max_len = 20, 32
    prompt = _padding([20, 13], s, left=(1,))
    ids = jnp.asarray(np.random.RandomState(4).randint(3, 250, (2, s))) * prompt
    base = presets.get("tiny-llama")
    params = jax.jit(mllm_jax.build_model(base).init)(jax.random.PRNGKey(1), ids)["params"]

    def generate(attention_impl):
        cfg = presets.get("tiny-llama")
        cfg.attention = attention_impl
        model = mllm_jax.build_model(cfg)
        cache = model.init_cache(2, max_len)
        logits, cache, positions = model.apply({"params": params}, ids, prompt, cache,
                                               method=model.prefill)
        kv_mask = jnp.concatenate([prompt, jnp.ones((2, max_len - s), jnp.int32)], 1)
        step, _ = model.apply({"params": params}, jnp.argmax(logits, -1), positions + 1,
                              kv_mask, cache, method=model.decode_step)
        return logits, cache, step

    ref_logits, ref_cache, ref_step = jax.jit(lambda: generate("xla"))()
    logits, cache, step = jax.jit(lambda: generate("splash_interpret"))()
    _rel_err(logits, ref_logits, "prefill logits")
    _rel_err(step, ref_step, "decode step logits")
    for i, (ours, theirs) in enumerate(zip(cache["v"], ref_cache["v"])):
        written = np.asarray(prompt, bool)  # slots of real prompt tokens
        _rel_err(np.asarray(ours).transpose(0, 2, 1, 3)[:, :s][written],
                 np.asarray(theirs).transpose(0, 2, 1, 3)[:, :s][written],
                 f"prefill cache v{i}")


def test_implementation_setting():
    """"auto" is XLA off TPU; "splash" off TPU and unknown values are refused by name."""
    assert presets.get("tiny-llama").attention == "xla"
    assert splash.resolve("auto") == "xla"  # these tests run on CPU
    assert splash.resolve("splash_interpret") == "splash_interpret"
    with pytest.raises(ValueError, match=r"model.attention = 'splash'.*'auto'"):
        splash.resolve("splash")
    with pytest.raises(ValueError, match=r"model.attention = 'flash' is not one of"):
        splash.resolve("flash")
    cfg = presets.get("tiny-llama")
    cfg.attention = "splash"
    model = mllm_jax.build_model(cfg)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)  # shapes on any host
    with pytest.raises(ValueError, match="model.attention = 'splash'"):
        jax.eval_shape(model.apply, params, ids)


def test_sharded_training_step_equals_xla():
    """One LLaVA stage-2 training step of the trainer on a (2, 2, 2) mesh: the loss, the
    gradient norm and the updated parameters with "splash_interpret" are those with "xla"."""
    from mllm_jax.data.sources import make_data
    from mllm_jax.train import recipe
    from mllm_jax.train.loop import build_trainer

    results = {}
    for attention_impl in ("xla", "splash_interpret"):
        cfg = recipe.base("tiny-llava")
        cfg.stage.trainable = [recipe.PROJECTOR, recipe.LLM]
        cfg.mesh.update(data=2, fsdp=2, tensor=2)
        cfg.train.update(global_batch_size=8, num_steps=3, warmup_ratio=0.0)
        cfg.data.text_len = 16
        cfg.model.attention = attention_impl
        batch = next(make_data(cfg, 0, 1))
        trainer = build_trainer(cfg)
        args = (trainer.state, trainer.frozen, trainer.frozen_extra,
                trainer.global_batch(batch))
        step = trainer.jit_step(batch)
        uses_kernel = "pallas_call" in str(jax.make_jaxpr(step)(*args))
        assert uses_kernel == (attention_impl != "xla"), attention_impl
        initial = jax.device_get(trainer.state.params)  # the step donates the state
        state, metrics = step(*args)
        results[attention_impl] = jax.device_get((metrics, state.params)), initial
    ((ref_metrics, ref_params), initial), ((metrics, params), _) = (
        results["xla"], results["splash_interpret"])
    for name in ("loss", "grad_norm"):
        _rel_err(metrics[name], ref_metrics[name], f"training step {name}")
    # Adam's first step moves every parameter by about lr (a rounding-level gradient too),
    # so the updates are compared in units of lr: 1% of a step at most.
    lr = cfg.train.lr
    moved = [np.abs(np.asarray(a, np.float64) - b).max() / lr for a, b in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params))]
    steps = [np.abs(np.asarray(a, np.float64) - b).max() / lr for a, b in zip(
        jax.tree_util.tree_leaves(ref_params), jax.tree_util.tree_leaves(initial))]
    print(f"training step: max |params_splash - params_xla| = {max(moved):.1e} lr "
          f"(the step moved them up to {max(steps):.2f} lr)")
    assert max(steps) > 0.5 and max(moved) <= 1e-2


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install 'jax[tpu]==<jax version>')")
def test_compiles_to_mosaic_kernels_for_a_tpu_topology():
    """For a TPU v5e 2x2 topology, compiled on this machine: the attention's forward and
    backward and a scanned, rematerialized decoder's training gradient with attention
    "auto" (entered with `with mesh:`, as the trainer does) hold the kernel's TPU custom
    calls (forward, dq, dkv)."""
    script = textwrap.dedent("""
        import json, jax, jax.numpy as jnp, numpy as np
        import flax.linen as nn
        from jax.experimental import topologies
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import mllm_jax
        from mllm_jax import presets, sharding
        from mllm_jax.models import splash
        devices = topologies.get_topology_desc("v5e:2x2", "tpu").devices
        mesh = Mesh(np.asarray(devices).reshape(2, 1, 2), sharding.MESH_AXES)
        rows = NamedSharding(mesh, P(("data", "fsdp"), None))
        b, s, h, kvh, d = 4, 1000, 8, 4, 128
        heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
        qkv = [jax.ShapeDtypeStruct((b, s, n, d), jnp.bfloat16, sharding=heads)
               for n in (h, kvh, kvh)]
        ids = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=rows)

        def attention_loss(q, k, v, mask):
            out = splash.causal_attention(q, k, v, splash.segment_mask(s, mask), d ** -0.5)
            return jnp.sum(out.astype(jnp.float32))
        with jax.set_mesh(mesh), sharding.activation_rules_context():
            resolved = splash.resolve("auto")
            kernel = jax.jit(jax.grad(attention_loss, (0, 1, 2))).lower(*qkv, ids).compile()

        cfg = presets.get("tiny-llama")
        cfg.text.update(head_dim=128, num_attention_heads=4, num_key_value_heads=2)
        cfg.update(scan_layers=True, remat_policy="dots_no_batch", attention="auto",
                   dtype="bfloat16")
        model = mllm_jax.build_model(cfg)
        tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=rows)
        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
        params = jax.tree_util.tree_map(
            lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                 sharding=NamedSharding(mesh, spec)),
            nn.unbox(boxed), sharding.param_specs(boxed))
        with mesh, sharding.activation_rules_context():

            def loss(p, ids, mask):
                logits = model.apply({"params": p}, ids, attention_mask=mask)
                return jnp.sum(logits.astype(jnp.float32) * mask[..., None])
            step = jax.jit(jax.grad(loss)).lower(params, tokens, tokens).compile()
        print(json.dumps({"platform": devices[0].platform, "auto": resolved,
                          "kernel": kernel.as_text().count("tpu_custom_call"),
                          "model": step.as_text().count("tpu_custom_call")}))
    """)
    result = run_tpu_script(script)
    assert result["platform"] == "tpu" and result["auto"] == "splash"
    assert result["kernel"] >= 3 and result["model"] >= 3  # forward, dq and dkv kernels
