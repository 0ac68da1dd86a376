"""Serving layouts and the compute dtype of generation.

On the 8-device CPU mesh (fsdp=2, tensor=4), `sharding.SERVING_RULES` splits the weights
over tensor only: greedy tokens equal a one-device run, and the compiled decode step
gathers no weight (the training rules, which split weights over fsdp too, do: so the check
can fail). `generate(dtype=jnp.bfloat16)` computes and caches keys/values in bf16 from the
float32 parameters as stored, with the same first tokens as float32.

A tiny random LLaMA (4 heads and 4 KV heads of 16, so tensor=4 divides them), its weights
scaled up so that greedy choices are far from ties.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mllm_jax
from mllm_jax import models, presets, sharding
from mllm_jax.convert.hf_io import abstract_params
from mllm_jax.eval import options as eval_options
from mllm_jax.infer import generate as gen

BATCH, NEW = 4, 8
COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\]\S* (all-gather|all-reduce|reduce-scatter|"
                        r"all-to-all|collective-permute)(-start)?\(")


@pytest.fixture(scope="module")
def tiny():
    cfg = presets.get("tiny-llama")
    cfg.text.num_key_value_heads = 4
    model = mllm_jax.build_model(cfg)
    params = jax.jit(lambda: nn.meta.unbox(model.init(
        jax.random.PRNGKey(3), *models.init_inputs(cfg))["params"]))()
    params = jax.tree_util.tree_map(lambda x: x * 10 if x.ndim >= 2 else x, params)
    return model, params


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(sharding.mesh_config(data=1, fsdp=2, tensor=4))


def _prompts(vocab, seed=0):
    """BATCH left-padded prompts of different lengths."""
    rs = np.random.RandomState(seed)
    lengths = [9, 5, 7, 3]
    ids = np.zeros((BATCH, max(lengths)), np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, -n:] = rs.randint(3, vocab, n)
        mask[i, -n:] = 1
    return ids, mask


# ---- 1. the serving layout decodes the one-device tokens ------------------------------------

def test_serving_rules_give_the_one_device_tokens(tiny, mesh):
    model, params = tiny
    ids, mask = _prompts(model.cfg.text.vocab_size)
    kw = dict(max_new_tokens=NEW, eos_token_id=None)
    one = gen.generate(model, params, ids, mask, **kw)
    many = gen.generate(model, params, ids, mask, mesh=mesh, **kw)  # SERVING_RULES
    np.testing.assert_array_equal(many, one)
    assert one.shape == (BATCH, NEW) and len(np.unique(one)) > 3  # not one token repeated
    # The serving layout: weights split over tensor only (4 ways), replicated over fsdp.
    placed = gen.place_on_mesh(model, params, mesh, ids, mask,
                               rules=sharding.SERVING_RULES)[0]
    layer = placed["model"]["layers_0"]
    q = layer["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.size == q.size // 4
    table = placed["model"]["embed_tokens"]["embedding"]
    assert table.addressable_shards[0].data.shape == (table.shape[0] // 4, table.shape[1])


# ---- 2. no weight is gathered by a decode step ------------------------------------------------

def _decode_collectives(model, mesh, rules, max_len=32):
    """(op, element count) of every collective in the compiled decode step (one token per
    sequence against a cache of max_len, then the greedy choice) with the parameters laid
    out by `rules`."""
    shardings = sharding.param_shardings(abstract_params(model, boxed=True), mesh, rules)
    params = jax.tree_util.tree_map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        abstract_params(model), shardings)
    rows = lambda *shape: jax.ShapeDtypeStruct(  # noqa: E731
        shape, jnp.int32, sharding=sharding.batch_sharding(mesh, len(shape)))

    def step(p, tok, pos, kv_mask):
        cache = model.init_cache(BATCH, max_len)
        logits, cache = model.apply({"params": p}, tok, pos, kv_mask, cache,
                                    method="decode_step")
        return jnp.argmax(logits, -1), cache

    with jax.set_mesh(mesh), sharding.activation_rules_context(rules):
        text = jax.jit(step).lower(params, rows(BATCH), rows(BATCH),
                                   rows(BATCH, max_len)).compile().as_text()
    return [(m.group(3), int(np.prod([int(d) for d in m.group(2).split(",") if d])))
            for m in COLLECTIVE.finditer(text)]


def _smallest_weight_shard(model, mesh):
    """Elements of the smallest 2-D weight once split over tensor: a collective this large
    moves (a piece of) a weight, not activations."""
    sizes = [x.size for x in jax.tree_util.tree_leaves(abstract_params(model)) if x.ndim >= 2]
    return min(sizes) // mesh.shape["tensor"]


def test_decode_step_gathers_no_weight_under_serving_rules(tiny, mesh):
    model, _ = tiny
    weight = _smallest_weight_shard(model, mesh)
    serving = _decode_collectives(model, mesh, sharding.SERVING_RULES)
    print("serving:", serving, "smallest weight shard", weight)
    assert serving, "a tensor-parallel step all-reduces its activations"
    assert all(n < weight for _, n in serving), serving
    assert {op for op, _ in serving} <= {"all-reduce", "all-gather"}
    # Only the greedy choice's (value, index) pairs are gathered: BATCH / data x fsdp rows
    # by tensor shards.
    assert all(n <= BATCH * mesh.shape["tensor"] for op, n in serving if op == "all-gather")
    # The training layout, with fsdp=2, gathers the weights in every decode step.
    training = _decode_collectives(model, mesh, sharding.LOGICAL_RULES)
    gathered = [n for op, n in training if op == "all-gather" and n >= weight]
    print("training all-gathers of weights:", gathered)
    assert len(gathered) >= 2 * model.cfg.text.num_hidden_layers


# ---- 3. the compute dtype --------------------------------------------------------------------

def test_bfloat16_compute_caches_in_bf16_from_float32_params(tiny, monkeypatch):
    model, params = tiny
    ids, mask = _prompts(model.cfg.text.vocab_size, seed=1)
    kw = dict(max_new_tokens=NEW, eos_token_id=None)
    f32 = gen.generate(model, params, ids, mask, **kw)
    seen = {}
    real = gen._generate

    def spy(model_, settings, params_, *args):  # what the generation program is built from
        seen["cache"] = {x.dtype for x in jax.tree_util.tree_leaves(
            jax.eval_shape(lambda: model_.init_cache(BATCH, 16))) if x.ndim > 0}
        seen["params"] = {x.dtype for x in jax.tree_util.tree_leaves(params_)}
        return real(model_, settings, params_, *args)

    monkeypatch.setattr(gen, "_generate", spy)
    bf16 = gen.generate(model, params, ids, mask, dtype=jnp.bfloat16, **kw)
    assert seen["cache"] == {jnp.dtype(jnp.bfloat16)}
    assert seen["params"] == {jnp.dtype(jnp.float32)}  # used as stored, not cast as a tree
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(bf16[:, 0], f32[:, 0])
    print("bf16 tokens equal to float32:", float(np.mean(bf16 == f32)))
    # The default stays the model's own float32; the model is rebuilt only for another dtype.
    assert gen.with_compute_dtype(model, None) is model
    assert gen.with_compute_dtype(model, "float32") is model
    assert gen.with_compute_dtype(model, "bfloat16").cfg.param_dtype == model.cfg.param_dtype


def test_dtype_and_rules_values_are_checked(tiny):
    model, params = tiny
    ids, mask = _prompts(model.cfg.text.vocab_size)
    with pytest.raises(ValueError, match=r"generate\(dtype=\.\.\.\) must be one of float32, "
                                         r"bfloat16, float16 .* got 'int8'"):
        gen.generate(model, params, ids, mask, max_new_tokens=2, eos_token_id=None,
                     dtype="int8")
    with pytest.raises(ValueError, match=r"--rules must be one of serving, training"):
        eval_options.EvalOptions(ckpt="c", task="pope", data="d", rules="fsdp")
    with pytest.raises(ValueError, match=r"--dtype must be one of float32, bfloat16, float16"):
        eval_options.EvalOptions(ckpt="c", task="pope", data="d", dtype="float64")
    with pytest.raises(ValueError, match="rules 'fsdp' is not a rules table; use one of "
                                         "serving, training"):
        sharding.named_rules("fsdp")
    assert set(eval_options.RULES) == set(sharding.NAMED_RULES)


# ---- 4. the command line and eval pass them on ------------------------------------------------

def test_eval_loads_stored_params_computes_in_dtype_and_lays_out_for_serving(tiny,
                                                                             monkeypatch):
    import mllm_jax.convert
    import mllm_jax.data.tokenizer
    from mllm_jax.eval import runner
    model, params = tiny
    loaded = {}

    def load_hf(path, dtype=None, **kw):
        loaded["dtype"] = dtype
        return model, params

    monkeypatch.setattr(mllm_jax.convert, "load_hf", load_hf)
    monkeypatch.setattr(mllm_jax.data.tokenizer, "load_tokenizer", lambda path: "tokenizer")
    options = runner.EvalOptions(ckpt="ckpt", task="pope", data="d", dtype="bfloat16",
                                 mesh="fsdp=2,tensor=4")
    got, placed, _, _, mesh = runner.load_runtime(options)
    assert loaded["dtype"] is None  # as stored
    assert got.cfg.dtype == "bfloat16" and got.cfg.param_dtype == model.cfg.param_dtype
    q = placed["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.dtype == jnp.float32 and q.addressable_shards[0].data.size == q.size // 4
    options = runner.EvalOptions(ckpt="ckpt", task="pope", data="d", param_dtype="bfloat16",
                                 mesh="fsdp=2,tensor=4", rules="training")
    got, placed, _, _, _ = runner.load_runtime(options)
    assert loaded["dtype"] == "bfloat16" and got is model  # compute dtype unchanged
    q = placed["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.size == q.size // 8  # fsdp x tensor


def test_generate_and_chat_take_a_compute_dtype(tiny, monkeypatch, capsys):
    import mllm_jax.convert
    import mllm_jax.infer.prompting
    from mllm_jax import cli
    model, params = tiny
    sessions = []

    class Session:
        def __init__(self, model_, params_, *args, **kw):
            sessions.append((model_, params_))

        def ask(self, text, images=()):
            return "answer"

    monkeypatch.setattr(mllm_jax.convert, "load_hf", lambda path, **kw: (model, params))
    monkeypatch.setattr(mllm_jax.infer.prompting, "Session", Session)
    assert cli.main(["generate", "--ckpt", "c", "--prompt", "hi", "--dtype", "bfloat16"]) == 0
    assert cli.main(["generate", "--ckpt", "c", "--prompt", "hi"]) == 0
    (bf16, p16), (f32, p32) = sessions
    assert bf16.cfg.dtype == "bfloat16" and p16 is params
    assert f32 is model and p32 is params
    with pytest.raises(SystemExit):
        cli.main(["chat", "--ckpt", "c", "--dtype", "float64"])
    assert "--dtype: invalid choice: 'float64' (choose from" in capsys.readouterr().err
