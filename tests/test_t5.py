"""T5 (`text.model_type` t5, `model_type` seq2seq_lm) against transformers'
`T5ForConditionalGeneration`: logits with padded encoder and decoder inputs, Flan-T5's
untied unscaled head (gated GELU) and original T5's tied scaled one (ReLU); load_hf of
save_pretrained directories and save_hf back into HF bitwise; greedy and beam-search tokens
through `infer.generate` equal to HF `generate`; config defaults and checks.
"""
import json
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (DynamicCache, EncoderDecoderCache, T5Config,
                          T5ForConditionalGeneration)

import mllm_jax
from mllm_jax import sharding
from mllm_jax.infer.generate import generate
from mllm_jax.models import registry
from mllm_jax.models.decoders import t5, t5_config

VOCAB, PAD, EOS = 100, 0, 1
NEW = 8
SIZES = dict(vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=3, d_ff=48, num_layers=2,
             num_decoder_layers=3, dropout_rate=0.0, pad_token_id=PAD, eos_token_id=EOS,
             decoder_start_token_id=PAD,
             # Few buckets and a short maximum distance: the logarithmic buckets and the
             # clamp are reached by these 13-token sequences.
             relative_attention_num_buckets=8, relative_attention_max_distance=12,
             layer_norm_epsilon=1e-5)


def build_hf(flan: bool, seed: int):
    """Flan-T5 (gated GELU, its own lm_head, no output scaling) or original T5 (ReLU, head
    tied to `shared`, decoder output scaled), with random norm scales."""
    torch.manual_seed(seed)
    if flan:
        cfg = T5Config(**SIZES, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    else:
        cfg = T5Config(**SIZES, feed_forward_proj="relu")
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
        if flan:
            # transformers 5 ties lm_head to shared unless a checkpoint stores its own, as
            # published Flan-T5 checkpoints do: give it one.
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 0.5)
            model.all_tied_weights_keys.pop("lm_head.weight")
    return model


def _saved(flan, tmp_path_factory):
    """(HF model, checkpoint dir, our model, params)."""
    ref = build_hf(flan, seed=3 if flan else 4)
    path = tmp_path_factory.mktemp("flan" if flan else "t5")
    ref.save_pretrained(path)
    model, params = mllm_jax.load_hf(path)
    return ref, path, model, params


@pytest.fixture(scope="module")
def flan(tmp_path_factory):
    return _saved(True, tmp_path_factory)


@pytest.fixture(scope="module")
def orig(tmp_path_factory):
    return _saved(False, tmp_path_factory)


@pytest.fixture(params=["flan", "orig"])
def pair(request):
    return request.getfixturevalue(request.param)


def encoder_inputs():
    rs = np.random.RandomState(0)
    ids = rs.randint(2, VOCAB, (3, 13))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # right padded
    mask[2, :4] = 0  # left padded
    ids[mask == 0] = PAD
    return ids, mask


def decoder_inputs():
    rs = np.random.RandomState(1)
    ids = rs.randint(2, VOCAB, (3, 7))
    ids[:, 0] = PAD  # the start token
    mask = np.ones_like(ids)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    return ids, mask


def hf_logits(ref, ids, mask, dec, dec_mask):
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  decoder_input_ids=torch.from_numpy(dec),
                  decoder_attention_mask=torch.from_numpy(dec_mask))
    return out.logits.numpy()


def test_config_read_as_hf_builds_it(pair):
    ref, _, model, _ = pair
    t = model.cfg.text
    assert model.cfg.model_type == "seq2seq_lm" and t.model_type == "t5"
    assert (t.hidden_size, t.head_dim, t.num_attention_heads) == (32, 8, 3)
    assert (t.num_hidden_layers, t.num_decoder_layers) == (2, 3)
    assert t.tie_word_embeddings == t.scale_decoder_outputs == ref.config.scale_decoder_outputs
    assert t5_config.feed_forward(t) == (ref.config.dense_act_fn, ref.config.is_gated_act)


def test_logits_match_hf(pair):
    ref, _, model, params = pair
    ids, mask = encoder_inputs()
    dec, dec_mask = decoder_inputs()
    want = hf_logits(ref, ids, mask, dec, dec_mask)
    got = np.asarray(jax.jit(lambda p, *a: model.apply(
        {"params": p}, a[0], None, a[1], decoder_input_ids=a[2],
        decoder_attention_mask=a[3]))(params, ids, mask, dec, dec_mask))
    real = dec_mask.astype(bool)  # HF's values at padded decoder queries depend on its kernel
    diff = np.abs(got - want)[real].max()
    print(f"max |logit diff| {diff:.2e} (logits up to {np.abs(want).max():.1f})")
    assert diff <= 1e-4
    # A dropped scale, bucket or mask is far outside that.
    assert np.abs(want).max() > 1.0


def test_relative_buckets_match_hf():
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = np.arange(-300, 301)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 12), (6, 20)):
            want = T5Attention._relative_position_bucket(
                torch.from_numpy(rel), bidirectional, buckets, distance).numpy()
            got = t5.relative_position_bucket(jnp.asarray(rel, jnp.int32), bidirectional,
                                              buckets, distance)
            np.testing.assert_array_equal(np.asarray(got), want)


def test_left_padding_gives_the_encoder_outputs_of_right_padding(flan):
    _, _, model, params = flan
    rs = np.random.RandomState(5)
    tokens = rs.randint(2, VOCAB, 6)
    right = np.full((1, 10), PAD)
    right[0, :6] = tokens
    left = np.full((1, 10), PAD)
    left[0, 4:] = tokens
    encode = jax.jit(lambda ids: model.apply({"params": params}, ids,
                                             (ids != PAD).astype(jnp.int32), method="encode"))
    out = np.asarray(encode(np.concatenate([left, right])))
    np.testing.assert_allclose(out[0, 4:], out[1, :6], atol=1e-5, rtol=1e-5)


def test_save_hf_loads_into_hf_bitwise(pair, tmp_path):
    ref, _, model, params = pair
    out = mllm_jax.save_hf(model, params, tmp_path / "out")
    back, info = T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    want, got = ref.state_dict(), back.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert back.config.scale_decoder_outputs == ref.config.scale_decoder_outputs


def test_load_accepts_stored_embedding_copies(pair, tmp_path):
    """Checkpoints written by older tools also store `encoder.embed_tokens`,
    `decoder.embed_tokens` (and the tied `lm_head`): read past them, under a composed
    model's prefix too."""
    from safetensors.numpy import load_file, save_file
    _, path, model, params = pair
    tensors = load_file(str(path / "model.safetensors"))
    for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        tensors[key] = tensors["shared.weight"]
    if model.cfg.text.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["shared.weight"]
    # Old checkpoints carry a cross-attention bias table that T5 never used.
    tensors["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = \
        np.ones((8, 3), np.float32)
    d = tmp_path / "copies"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text((path / "config.json").read_text())
    _, loaded = mllm_jax.load_hf(d)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    patterns = registry.DECODERS.get("t5").unused_keys(model.cfg.text, "language_model.")
    skipped = {k for k in tensors for p in patterns
               if re.search(p, "language_model." + k)}
    assert skipped == set(tensors) - set(mllm_jax.convert.hf_io._expected(model)[0])


def left_pad_prompts(n=2):
    rs = np.random.RandomState(7)
    samples = [list(rs.randint(2, VOCAB, k)) + [EOS] for k in (9, 4, 6, 2)[:n]]
    s = max(len(x) for x in samples)
    ids = np.full((n, s), PAD, np.int64)
    mask = np.zeros((n, s), np.int64)
    for i, x in enumerate(samples):
        ids[i, s - len(x):] = x
        mask[i, s - len(x):] = 1
    return ids, mask


def hf_generate(ref, ids, mask, eos=EOS, **kw):
    # HF sizes the cache it makes by num_layers (the encoder's); this decoder has more
    # layers, so give it caches that grow per layer.
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.no_grad():
        out = ref.generate(input_ids=torch.from_numpy(ids),
                           attention_mask=torch.from_numpy(mask), do_sample=False,
                           max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD,
                           cache=cache, **kw)
    assert (out[:, 0] == PAD).all()  # the decoder start token
    return out[:, 1:].numpy()


def test_greedy_matches_hf(flan):
    ref, _, model, params = flan
    ids, mask = left_pad_prompts()
    # A second EOS id that the second sample emits at its third step: it stops there and
    # is padded after, as HF pads it.
    eos = [EOS, int(hf_generate(ref, ids, mask)[1, 2])]
    want = hf_generate(ref, ids, mask, eos=eos)
    got = generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=eos,
                   pad_token_id=PAD)
    np.testing.assert_array_equal(got, want)
    assert (want[1, 3:] == PAD).all() and got.shape == (2, NEW)
    assert len(set(want[0].tolist())) > 3  # not one token repeated


def test_beam_search_matches_hf_on_a_mesh(flan):
    """Beam search with the parameters sharded by the training rules on a (data=2, fsdp=2,
    tensor=2) mesh and the prompts (and so the cache) split over data x fsdp."""
    ref, _, model, params = flan
    ids, mask = left_pad_prompts(4)
    want = hf_generate(ref, ids, mask, num_beams=3, length_penalty=0.6)
    mesh = sharding.make_mesh(sharding.mesh_config(data=2, fsdp=2, tensor=2))
    got = generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=EOS,
                   pad_token_id=PAD, num_beams=3, length_penalty=0.6, mesh=mesh)
    np.testing.assert_array_equal(got, want)


def test_prefill_from_input_embeddings_matches_hf(orig):
    """Composed models (BLIP-2) give the encoder's input embeddings: prefill's logits are
    HF's for the decoder start token (original T5: the decoder output scaled before the
    tied head, which greedy decoding cannot tell)."""
    ref, _, model, params = orig
    ids, mask = left_pad_prompts()
    b, s = ids.shape

    @jax.jit
    def prefill(params, ids, mask):
        embeds = model.apply({"params": params}, ids, method="embed")
        logits, cache, _ = model.apply({"params": params}, None, mask, model.init_cache(b, s + 2),
                                       method="prefill", inputs_embeds=embeds)
        return logits, cache
    logits, cache = prefill(params, ids, mask)
    start = np.full((b, 1), PAD)
    want = hf_logits(ref, ids, mask, start, np.ones_like(start))[:, 0]
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=1e-4)
    assert int(cache["index"]) == 1
    assert cache["cross_k"][2].shape == (b, 3, s, 8) and cache["encoder_mask"].shape == (b, s)


def test_hf_defaults_are_transformers():
    hf = T5Config()
    t = t5_config.text_from_hf({"model_type": "t5"})
    for ours, theirs in t5_config.HF_NAMES.items():
        want = getattr(hf, theirs, None)
        if theirs == "decoder_start_token_id" and want is None:
            want = hf.pad_token_id  # T5 starts decoding from the pad token
        assert t[ours] == want, ours
    assert t.tie_word_embeddings and t.scale_decoder_outputs == hf.scale_decoder_outputs
    assert t5_config.feed_forward(t) == (hf.dense_act_fn, hf.is_gated_act)


def test_configs_written_before_transformers_5():
    """Flan-T5's published config says tie_word_embeddings: false and nothing about
    scaling; transformers 5 writes tie_word_embeddings: true with scale_decoder_outputs."""
    old = t5_config.text_from_hf({"model_type": "t5", "tie_word_embeddings": False})
    new = t5_config.text_from_hf({"model_type": "t5", "tie_word_embeddings": True,
                                  "scale_decoder_outputs": False})
    assert not old.tie_word_embeddings and not old.scale_decoder_outputs
    assert not new.tie_word_embeddings and not new.scale_decoder_outputs
    orig = t5_config.text_from_hf({"model_type": "t5"})
    assert orig.tie_word_embeddings and orig.scale_decoder_outputs


@pytest.mark.parametrize("field,value", [
    ("d_model", 0), ("num_heads", -1), ("d_kv", 2.5), ("num_decoder_layers", 100000),
    ("relative_attention_num_buckets", 2), ("relative_attention_max_distance", 4),
    ("feed_forward_proj", "gated-unknown"), ("feed_forward_proj", "a-b-c"),
    ("layer_norm_epsilon", 0), ("decoder_start_token_id", -1),
])
def test_bad_config_values_name_the_field(field, value):
    from mllm_jax.convert.hf_config import from_hf
    with pytest.raises(registry.InvalidConfigError, match=field):
        from_hf({"model_type": "t5", field: value}, where="dir/config.json")


def test_hf_model_type_t5_is_read_as_seq2seq_lm():
    assert registry.family_for_hf("t5")[0] == "seq2seq_lm"
    assert "t5" not in registry.MODELS.get("causal_lm").hf_model_types()
    text = t5_config.t5_text_config(vocab_size=VOCAB, hidden_size=32)
    lm = registry.language_model(t5_config.seq2seq_config(text))
    assert isinstance(lm, t5.T5ForConditionalGeneration)


def small_model(**text):
    fields = dict(vocab_size=VOCAB, hidden_size=32, head_dim=8, num_attention_heads=3,
                  intermediate_size=48, num_hidden_layers=2, num_decoder_layers=3,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    fields.update(text)
    return mllm_jax.build_model(t5_config.seq2seq_config(t5_config.t5_text_config(**fields)))


def test_every_parameter_has_logical_axes():
    model = small_model()
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32))
    leaves = jax.tree_util.tree_leaves(boxed["params"],
                                       is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    known = {name for name, _ in sharding.LOGICAL_RULES}
    for leaf in leaves:
        assert all(n is None or n in known for n in leaf.names), leaf.names
    specs = flax.traverse_util.flatten_dict(sharding.param_specs(boxed["params"]))
    assert specs[("lm_head", "kernel")] == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert specs[("encoder", "block_0", "layer_1", "DenseReluDense", "wo", "kernel")] == \
        jax.sharding.PartitionSpec("tensor", "fsdp")


def test_flop_count_matches_xla():
    """The registered count (matmuls) against XLA's count of the compiled forward, which
    adds the element-wise work; a missing cross-attention or feed-forward term is outside."""
    model = small_model(vocab_size=512, hidden_size=128, head_dim=32, num_attention_heads=4,
                        intermediate_size=512)
    ids = jnp.zeros((1, 48), jnp.int32)
    dec = jnp.zeros((1, 48), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]
    fn = jax.jit(lambda p, i, d: model.apply({"params": p}, i, decoder_input_ids=d))
    cost = fn.lower(params, ids, dec).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = t5_config.text_forward_flops(model.cfg.text, 48)
    print(f"XLA flops / counted: {cost['flops'] / flops:.3f}")
    assert 1.0 <= cost["flops"] / flops <= 1.08, cost["flops"] / flops


def test_saved_config_round_trips(flan, tmp_path):
    _, _, model, params = flan
    out = mllm_jax.save_hf(model, params, tmp_path / "out")
    hf = json.loads((out / "config.json").read_text())
    again = t5_config.text_from_hf(hf)
    assert again.to_dict() == model.cfg.text.to_dict()
