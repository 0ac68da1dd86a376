"""KV-cache generation (`mllm_jax.infer.generate`): greedy tokens equal transformers'
`generate` on tiny random HF models (text-only Llama and LLaVA with images, left padded
batches, unrolled and scanned layers), sampling is deterministic per key and follows HF's
warpers, and the compiled decode step's cost grows with the cache only by the attention read.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration
from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

import hf_factories as hf  # tests/ is on sys.path (pytest rootdir insertion)
import mllm_jax
from mllm_jax.infer import generate as gen
from mllm_jax.infer import sampling

SCAN = pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
VOCAB = hf.TEXT_DEFAULTS["vocab_size"]
PAD = hf.TEXT_DEFAULTS["pad_token_id"]
BOS = hf.TEXT_DEFAULTS["bos_token_id"]
EOS = hf.TEXT_DEFAULTS["eos_token_id"]
NEW = 10
# Large initializer range: spread logits, so greedy choices are far from ties and the
# generated sequences are not one token repeated.
INIT = 0.3


def left_pad(samples):
    s = max(len(x) for x in samples)
    ids = np.full((len(samples), s), PAD, np.int64)
    mask = np.zeros((len(samples), s), np.int64)
    for i, x in enumerate(samples):
        ids[i, s - len(x):] = x
        mask[i, s - len(x):] = 1
    return ids, mask


def hf_generate(model, ids, mask, eos=EOS, **kw):
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             do_sample=False, max_new_tokens=NEW, eos_token_id=eos,
                             pad_token_id=PAD, **kw)
    return out[:, ids.shape[1]:].numpy()


@functools.lru_cache(maxsize=None)
def _load(path, scan):
    return mllm_jax.load_hf(path, scan_layers=scan)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    # A context of 512: test_long_prompt_prefill_matches_hf's prompts (301 tokens) fit.
    path = hf.make_llama(tmp_path_factory.mktemp("llama"), seed=6, initializer_range=INIT,
                         max_position_embeddings=512)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ref, str(path)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    model = hf.build_llava(seed=22, text_overrides=dict(initializer_range=INIT))
    path = hf.save(model, tmp_path_factory.mktemp("llava"))
    ref = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return ref, str(path)


def text_prompts(seed=0):
    rs = np.random.RandomState(seed)
    return left_pad([[BOS] + list(rs.randint(3, VOCAB - 1, 9)),
                     [BOS] + list(rs.randint(3, VOCAB - 1, 5))])


@SCAN
def test_llama_greedy_matches_hf(llama, scan):
    ref, path = llama
    ids, mask = text_prompts()
    expected = hf_generate(ref, ids, mask)
    assert len(set(expected[0].tolist())) > NEW // 2, expected  # not degenerate
    model, params = _load(path, scan)
    ours = gen.generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=EOS,
                        pad_token_id=PAD)
    np.testing.assert_array_equal(ours, expected)


def test_long_prompt_prefill_matches_hf(llama):
    """Prompts longer than the prefill's causal block (128 queries), left padded."""
    ref, path = llama
    rs = np.random.RandomState(3)
    ids, mask = left_pad([[BOS] + list(rs.randint(3, VOCAB - 1, 300)),
                          [BOS] + list(rs.randint(3, VOCAB - 1, 170))])
    model, params = _load(path, False)
    ours = gen.generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=EOS,
                        pad_token_id=PAD)
    np.testing.assert_array_equal(ours, hf_generate(ref, ids, mask))


def test_stop_sequences_end_a_sample_like_eos(llama):
    """A sample ends once its generated tokens end with a stop sequence (kept, then pad),
    the other goes on; with every sample stopped, fewer columns come back."""
    ref, path = llama
    ids, mask = text_prompts()
    free = hf_generate(ref, ids, mask)
    model, params = _load(path, False)
    kw = dict(max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD)
    stop = [int(free[0, 3]), int(free[0, 4])]
    ours = gen.generate(model, params, ids, mask, stop_sequences=[stop, [VOCAB + 5]], **kw)
    np.testing.assert_array_equal(ours[0, :5], free[0, :5])
    assert (ours[0, 5:] == PAD).all()
    first = next((i for i in range(1, NEW) if list(free[1, i - 1:i + 1]) == stop), None)
    expected1 = free[1] if first is None else np.where(np.arange(NEW) > first, PAD, free[1])
    np.testing.assert_array_equal(ours[1, :ours.shape[1]], expected1[:ours.shape[1]])
    alone = gen.generate(model, params, ids[:1], mask[:1], stop_sequences=[stop], **kw)
    np.testing.assert_array_equal(alone, free[:1, :5])
    with pytest.raises(ValueError, match="beam search"):
        gen.generate(model, params, ids, mask, stop_sequences=[stop], num_beams=2, **kw)
    with pytest.raises(ValueError, match="empty"):
        gen.generate(model, params, ids, mask, stop_sequences=[[]], **kw)


def test_llama_eos_stops_and_pads_like_hf(llama):
    """An EOS met mid-way: that sample continues with pad ids; generation stops once every
    sample has finished (HF returns fewer than max_new_tokens columns then)."""
    ref, path = llama
    ids, mask = text_prompts()
    free = hf_generate(ref, ids, mask)
    model, params = _load(path, False)
    # Sample 0 stops at step 3, sample 1 at its first occurrence of either id (or never).
    eos = [int(free[0, 3]), int(free[1, 6])]
    expected = hf_generate(ref, ids, mask, eos=eos)
    ours = gen.generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=eos,
                        pad_token_id=PAD)
    np.testing.assert_array_equal(ours, expected)
    assert (ours[0, 4:] == PAD).all() and ours.shape[1] <= NEW
    # Both samples end early: fewer columns.
    first = gen.generate(model, params, ids[:1], mask[:1], max_new_tokens=NEW,
                         eos_token_id=int(free[0, 3]), pad_token_id=PAD)
    np.testing.assert_array_equal(first, free[:1, :4])


def llava_prompts(config, seed=0):
    """Sample 0: two images; sample 1: one image, left padded. Image tokens expanded."""
    rs = np.random.RandomState(seed)
    img = [config.image_token_index] * config.image_seq_length
    text = lambda k: list(rs.randint(3, VOCAB - 1, k))  # noqa: E731
    ids, mask = left_pad([[BOS] + text(3) + img + text(2) + img + text(4),
                          [BOS] + text(2) + img + text(3)])
    nhwc, nchw = hf.random_pixels(3, config.vision_config.image_size, seed=seed)
    return ids, mask, nhwc, nchw


@SCAN
def test_llava_greedy_matches_hf(llava, scan):
    ref, path = llava
    ids, mask, nhwc, nchw = llava_prompts(ref.config, seed=4)
    expected = hf_generate(ref, ids, mask, pixel_values=nchw)
    assert len(set(expected[0].tolist())) > NEW // 2, expected
    model, params = _load(path, scan)
    ours = gen.generate(model, params, ids, mask, pixel_values=nhwc, max_new_tokens=NEW,
                        eos_token_id=EOS, pad_token_id=PAD)
    np.testing.assert_array_equal(ours, expected)
    # The images matter: other pixels give other tokens.
    other = gen.generate(model, params, ids, mask, pixel_values=-nhwc, max_new_tokens=NEW,
                         eos_token_id=EOS, pad_token_id=PAD)
    assert (other != ours).any()


def test_llava_image_token_count_is_checked(llava):
    ref, path = llava
    ids, mask, nhwc, _ = llava_prompts(ref.config, seed=4)
    model, params = _load(path, False)
    with pytest.raises(ValueError, match="image tokens"):
        gen.generate(model, params, ids, mask, pixel_values=nhwc[:2], max_new_tokens=2,
                     eos_token_id=EOS)


def test_sampling_is_deterministic_and_top_k_1_is_greedy(llama):
    _, path = llama
    ids, mask = text_prompts()
    model, params = _load(path, False)
    run = functools.partial(gen.generate, model, params, ids, mask, max_new_tokens=NEW,
                            eos_token_id=None)
    greedy = run()
    key = jax.random.PRNGKey(7)
    a = run(do_sample=True, temperature=1.5, top_k=20, top_p=0.9, rng=key)
    b = run(do_sample=True, temperature=1.5, top_k=20, top_p=0.9, rng=key)
    np.testing.assert_array_equal(a, b)
    c = run(do_sample=True, temperature=1.5, top_k=20, top_p=0.9, rng=jax.random.PRNGKey(8))
    assert (a != c).any() and (a != greedy).any()
    np.testing.assert_array_equal(run(do_sample=True, top_k=1, rng=key), greedy)
    np.testing.assert_array_equal(run(do_sample=True, temperature=0.7, top_p=1e-6, rng=key),
                                  greedy)


@pytest.mark.parametrize("temperature,top_k,top_p",
                         [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (1.3, 10, 0.5)])
def test_warpers_match_hf(temperature, top_k, top_p):
    logits = np.random.RandomState(0).standard_normal((4, VOCAB)).astype(np.float32) * 3
    scores = torch.from_numpy(logits)
    for warper in ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + \
            ([TopKLogitsWarper(top_k)] if top_k else []) + \
            ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []):
        scores = warper(None, scores)
    ref = scores.numpy()
    ours = np.asarray(sampling.warp_logits(jnp.asarray(logits), temperature=temperature,
                                           top_k=top_k, top_p=top_p))
    np.testing.assert_array_equal(np.isfinite(ref) & (ref > -1e30), ours > -1e30)
    kept = ours > -1e30
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)


# ---- cost of a decode step -------------------------------------------------------------------

def _decode_flops(model, params, batch, max_len, index):
    cache = model.init_cache(batch, max_len)
    cache["index"] = jnp.int32(index)
    step = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method="decode_step"))
    compiled = step.lower(params, jnp.zeros((batch,), jnp.int32),
                          jnp.full((batch,), index, jnp.int32),
                          jnp.ones((batch, max_len), jnp.int32), cache).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@SCAN
def test_decode_step_cost_grows_only_by_the_attention_read(llama, scan):
    """Compiled decode-step flops for caches of L, 2L, 3L slots: exactly linear in the cache
    length (the rest of the step is constant), and the per-slot slope is the attention read,
    2 matmuls x 2 flops x b x heads x head_dim per layer, plus a few elementwise flops per
    score (scale, mask, max, exp-shift, sum). The write index is a runtime value, so the
    step at any position is one and the same program: no growth with generated tokens."""
    _, path = llama
    model, params = _load(path, scan)
    t = model.cfg.text
    b, L = 2, 64
    # XLA's cost analysis counts a while-loop body once, whatever its trip count: a scanned
    # stack shows the cost of one layer.
    layers = 1 if scan else t.num_hidden_layers
    f1, f2, f3 = (_decode_flops(model, params, b, n * L, 5) for n in (1, 2, 3))
    assert f3 - f2 == f2 - f1, (f1, f2, f3)
    per_slot = (f2 - f1) / L
    matmuls = 4 * b * t.num_attention_heads * t.head_dim * layers
    scores = b * t.num_attention_heads * layers
    assert matmuls <= per_slot <= matmuls + 12 * scores, (per_slot, matmuls, scores)
    # The constant part: everything but the attention read (projections, MLP, norms, head).
    constant = f1 - per_slot * L
    d, f, v = t.hidden_size, t.intermediate_size, t.vocab_size
    kv = t.num_key_value_heads * t.head_dim
    dense = 2 * b * (layers * (2 * d * d + 2 * d * kv + 3 * d * f) + d * v)
    assert dense <= constant <= 1.5 * dense, (constant, dense)
    # Same cache length, a later write position: the very same cost.
    assert _decode_flops(model, params, b, 2 * L, 100) == f2


# ---- beam search -----------------------------------------------------------------------------

def hf_beam(model, ids, mask, eos, **kw):
    return hf_generate(model, ids, mask, eos=eos, num_beams=5, **kw)


@pytest.mark.parametrize("length_penalty,early_stopping",
                         [(1.0, False), (2.0, False), (-1.0, False), (0.0, "never"),
                          (1.0, True)])
def test_llama_beam_search_matches_hf(llama, length_penalty, early_stopping):
    """5 beams, left-padded batch, hypotheses finishing at different lengths: the ids that
    end them are tokens the free beam search emits, so EOS is met mid-way."""
    ref, path = llama
    ids, mask = text_prompts()
    free = hf_beam(ref, ids, mask, eos=EOS)
    eos = [int(free[0, 2]), int(free[1, 5])]
    kw = dict(length_penalty=length_penalty, early_stopping=early_stopping)
    expected = hf_beam(ref, ids, mask, eos=eos, **kw)
    model, params = _load(path, False)
    ours = gen.generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=eos,
                        pad_token_id=PAD, num_beams=5, **kw)
    np.testing.assert_array_equal(ours, expected)


def test_llama_beam_search_differs_from_greedy(llama):
    ref, path = llama
    ids, mask = text_prompts()
    model, params = _load(path, False)
    beam = gen.generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=EOS,
                        pad_token_id=PAD, num_beams=5)
    np.testing.assert_array_equal(beam, hf_beam(ref, ids, mask, eos=EOS))
    greedy = gen.generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=EOS,
                          pad_token_id=PAD)
    assert (beam != greedy).any()  # otherwise the comparison above shows nothing new


@SCAN
def test_llava_beam_search_matches_hf(llava, scan):
    """BLIP-2's zero-shot VQA setting: 5 beams and a length penalty, with images."""
    ref, path = llava
    ids, mask, nhwc, nchw = llava_prompts(ref.config, seed=4)
    free = hf_beam(ref, ids, mask, eos=EOS, pixel_values=nchw)
    eos = [int(free[0, 3]), int(free[1, 4])]
    expected = hf_beam(ref, ids, mask, eos=eos, pixel_values=nchw, length_penalty=-1.0)
    model, params = _load(path, scan)
    ours = gen.generate(model, params, ids, mask, pixel_values=nhwc, max_new_tokens=NEW,
                        eos_token_id=eos, pad_token_id=PAD, num_beams=5,
                        length_penalty=-1.0)
    np.testing.assert_array_equal(ours, expected)


def test_beam_search_rejects_bad_settings(llama):
    _, path = llama
    model, params = _load(path, False)
    ids, mask = text_prompts()
    with pytest.raises(ValueError, match="num_beams"):
        gen.generate(model, params, ids, mask, max_new_tokens=2, eos_token_id=EOS, num_beams=0)
    with pytest.raises(ValueError, match="deterministic"):
        gen.generate(model, params, ids, mask, max_new_tokens=2, eos_token_id=EOS,
                     num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="early_stopping"):
        gen.generate(model, params, ids, mask, max_new_tokens=2, eos_token_id=EOS,
                     num_beams=2, early_stopping="sometimes")


# ---- sharded decoding ------------------------------------------------------------------------

def four_llava_prompts(config):
    """Four prompts (divisible by the mesh's data x fsdp = 4), images in prompt order."""
    a, am, apx, _ = llava_prompts(config, seed=4)
    b, bm, bpx, _ = llava_prompts(config, seed=7)
    s = max(a.shape[1], b.shape[1])
    pad = lambda x, v: np.pad(x, ((0, 0), (s - x.shape[1], 0)), constant_values=v)  # noqa: E731
    ids = np.concatenate([pad(a, PAD), pad(b, PAD)])
    mask = np.concatenate([pad(am, 0), pad(bm, 0)])
    return ids, mask, np.concatenate([apx, bpx])


@pytest.mark.parametrize("beams", [1, 3])
def test_sharded_decoding_equals_one_device(llava, beams):
    """Parameters sharded by the training rules on a (data=2, fsdp=2, tensor=2) mesh and
    prompts split over data x fsdp: the same tokens as on one device."""
    from mllm_jax import sharding
    ref, path = llava
    model, params = _load(path, True)
    ids, mask, pixels = four_llava_prompts(ref.config)
    kw = dict(max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD, num_beams=beams)
    one = gen.generate(model, params, ids, mask, pixel_values=pixels, **kw)
    mesh = sharding.make_mesh(sharding.mesh_config(data=2, fsdp=2, tensor=2))
    placed, sids, _, _, _ = gen.place_on_mesh(model, params, mesh, ids, mask, pixels)
    assert len(sids.sharding.device_set) == 8 and not sids.sharding.is_fully_replicated
    q = placed["language_model"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.size == q.size // 4  # fsdp x tensor
    with jax.set_mesh(mesh), sharding.activation_rules_context():
        cache = jax.jit(lambda: model.init_cache(4, 64))()
    layers, _, kv_heads, _, head_dim = cache["k"].shape
    assert cache["k"].addressable_shards[0].data.shape == (layers, 1, kv_heads // 2, 64,
                                                           head_dim)
    many = gen.generate(model, params, ids, mask, pixel_values=pixels, mesh=mesh, **kw)
    np.testing.assert_array_equal(many, one)
    # A batch that does not divide over the data axes is replicated, with the same result.
    odd = gen.generate(model, params, ids[:2], mask[:2], pixel_values=pixels[:3], mesh=mesh,
                       **kw)
    np.testing.assert_array_equal(odd, gen.generate(model, params, ids[:2], mask[:2],
                                                    pixel_values=pixels[:3], **kw))
