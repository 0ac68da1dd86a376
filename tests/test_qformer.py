"""The Q-Former connector against transformers' Blip2QFormerModel / InstructBlipQFormerModel:
tiny random models (3 layers, cross-attention in layers 0 and 2, layer_norm_eps 1e-6), the
HF tensors loaded through our key mapping, `last_hidden_state` compared; bitwise round trips
of the tensors and of the config."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from transformers import Blip2QFormerConfig, InstructBlipQFormerConfig

from hf_factories import build_qformer
from mllm_jax import models, sharding
from mllm_jax.models.connectors import qformer_hf
from mllm_jax.models.connectors.qformer import QFormerConnector, QFormerModel

TOL = 1e-5
BATCH, QUERIES, IMAGE_TOKENS = 2, 5, 7


def _state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _convert(hf_model, num_query_tokens=QUERIES):
    q = qformer_hf.qformer_from_hf(hf_model.config.to_dict(),
                                   num_query_tokens=num_query_tokens)
    params = qformer_hf.params_from_hf(_state(hf_model), qformer_hf.abstract_qformer_params(q))
    return q, params


def _inputs(seed=0, d=32, d_img=24):
    rng = np.random.RandomState(seed)
    queries = rng.standard_normal((BATCH, QUERIES, d)).astype(np.float32)
    # Different values per sample (the second scaled and shifted), so mixing up the batch
    # rows of the cross-attention shows.
    image = rng.standard_normal((BATCH, IMAGE_TOKENS, d_img)).astype(np.float32)
    image[1] = 3.0 * image[1] + 1.0
    return queries, image


def _max_diff(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours) - theirs.detach().numpy())))


def test_blip2_qformer_matches_transformers():
    hf = build_qformer("blip_2_qformer")
    q, params = _convert(hf)
    assert q.layer_norm_eps == 1e-6 and q.cross_attention_frequency == 2
    queries, image = _inputs()
    image_mask = np.ones((BATCH, IMAGE_TOKENS), np.int64)
    image_mask[1, -3:] = 0  # the second sample's last features are padding
    with torch.no_grad():
        want = hf(query_embeds=torch.from_numpy(queries),
                  encoder_hidden_states=torch.from_numpy(image),
                  encoder_attention_mask=torch.from_numpy(image_mask)).last_hidden_state
    got = QFormerModel(q).apply({"params": params}, jnp.asarray(queries), jnp.asarray(image),
                                image_mask=jnp.asarray(image_mask))
    assert got.shape == (BATCH, QUERIES, 32)
    assert _max_diff(got, want) <= TOL
    # The padded features are ignored: changing them changes nothing.
    image2 = image.copy()
    image2[1, -3:] += 5.0
    again = QFormerModel(q).apply({"params": params}, jnp.asarray(queries),
                                  jnp.asarray(image2), image_mask=jnp.asarray(image_mask))
    assert float(jnp.max(jnp.abs(again - got))) <= 1e-6


def test_blip2_qformer_with_text_positions_matches_transformers():
    """BLIP-2's retrieval layout: text embeddings after the queries, `query_length` set,
    text positions through `intermediate` / `output`, a padded text mask."""
    hf = build_qformer("blip_2_qformer", use_qformer_text_input=True, seed=3)
    q, params = _convert(hf)
    queries, image = _inputs(seed=3)
    text = np.random.RandomState(4).standard_normal((BATCH, 4, 32)).astype(np.float32)
    embeds = np.concatenate([queries, text], axis=1)
    mask = np.ones((BATCH, QUERIES + 4), np.int64)
    mask[0, -2:] = 0
    with torch.no_grad():
        want = hf(query_embeds=torch.from_numpy(embeds), query_length=QUERIES,
                  attention_mask=torch.from_numpy(mask),
                  encoder_hidden_states=torch.from_numpy(image)).last_hidden_state
    got = QFormerModel(q).apply({"params": params}, jnp.asarray(embeds), jnp.asarray(image),
                                attention_mask=jnp.asarray(mask), query_length=QUERIES)
    assert _max_diff(got, want) <= TOL


def test_blip2_text_alone_matches_transformers():
    """query_length=0 (BLIP-2's text encoder): no cross-attention, text feed-forward only."""
    hf = build_qformer("blip_2_qformer", use_qformer_text_input=True, seed=8)
    q, params = _convert(hf)
    text = np.random.RandomState(8).standard_normal((BATCH, 6, 32)).astype(np.float32)
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        want = hf(query_embeds=torch.from_numpy(text), query_length=0,
                  attention_mask=torch.from_numpy(mask)).last_hidden_state
    got = QFormerModel(q).apply({"params": params}, jnp.asarray(text), None,
                                attention_mask=jnp.asarray(mask), query_length=0)
    assert _max_diff(got, want) <= TOL


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_instructblip_qformer_matches_transformers(attn_implementation):
    hf = build_qformer("instructblip_qformer", seed=1, attn_implementation=attn_implementation)
    q, params = _convert(hf)
    queries, image = _inputs(seed=1)
    # Right-padded instructions of 6 and 3 tokens, as the processor gives them.
    ids = np.array([[5, 17, 9, 33, 2, 41], [7, 12, 60, 0, 0, 0]], np.int64)
    text_mask = (np.arange(6)[None] < np.array([[6], [3]])).astype(np.int64)
    mask = np.concatenate([np.ones((BATCH, QUERIES), np.int64), text_mask], axis=1)
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  query_embeds=torch.from_numpy(queries),
                  encoder_hidden_states=torch.from_numpy(image)).last_hidden_state
    got = QFormerModel(q).apply({"params": params}, jnp.asarray(queries), jnp.asarray(image),
                                input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert got.shape == (BATCH, QUERIES + 6, 32)
    assert _max_diff(got, want) <= TOL
    # The instruction reaches the queries: another instruction changes their outputs.
    other = QFormerModel(q).apply({"params": params}, jnp.asarray(queries), jnp.asarray(image),
                                  input_ids=jnp.asarray(ids[::-1].copy()),
                                  attention_mask=jnp.asarray(mask[::-1].copy()))
    assert float(jnp.max(jnp.abs(other[:, :QUERIES] - got[:, :QUERIES]))) > 1e-3


def _connector_cfg(q, text_hidden=40):
    return ml_collections.ConfigDict(dict(projector=q, text={"hidden_size": text_hidden},
                                          dtype="float32", param_dtype="float32"))


def test_connector_matches_hf_composition_and_hf_names():
    """`query_tokens`, `qformer.*`, `language_projection.*` (Blip2ForConditionalGeneration's
    names) load into the connector, whose output is HF's language-model inputs for the
    queries: language_projection(qformer(query_tokens, image)[:, :q]), with an instruction."""
    hf = build_qformer("instructblip_qformer", seed=2)
    q = qformer_hf.qformer_from_hf(hf.config.to_dict(), num_query_tokens=QUERIES)
    gen = torch.Generator().manual_seed(5)
    query_tokens = torch.randn(1, QUERIES, 32, generator=gen)
    projection = torch.nn.Linear(32, 40)
    tensors = {"query_tokens": query_tokens.numpy(),
               "language_projection.weight": projection.weight.detach().numpy(),
               "language_projection.bias": projection.bias.detach().numpy(),
               **{f"qformer.{k}": v for k, v in _state(hf).items()}}
    cfg = _connector_cfg(q)
    connector = QFormerConnector(cfg)
    _, image = _inputs(seed=2)
    ids = np.array([[5, 17, 9, 33], [7, 12, 0, 0]], np.int64)
    text_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int64)
    abstract = jax.eval_shape(connector.init, jax.random.PRNGKey(0), jnp.asarray(image))
    params = qformer_hf.params_from_hf(tensors, abstract["params"])
    with torch.no_grad():
        mask = torch.cat([torch.ones(BATCH, QUERIES, dtype=torch.long),
                          torch.from_numpy(text_mask)], 1)
        out = hf(input_ids=torch.from_numpy(ids), attention_mask=mask,
                 query_embeds=query_tokens.expand(BATCH, -1, -1),
                 encoder_hidden_states=torch.from_numpy(image)).last_hidden_state
        want = projection(out[:, :QUERIES])
    got = connector.apply({"params": params}, jnp.asarray(image), jnp.asarray(ids),
                          jnp.asarray(text_mask))
    assert got.shape == (BATCH, QUERIES, 40)
    assert _max_diff(got, want) <= TOL
    back = qformer_hf.params_to_hf(params)
    assert sorted(back) == sorted(tensors)
    assert all(back[k].dtype == tensors[k].dtype and np.array_equal(back[k], tensors[k])
               for k in tensors)


@pytest.mark.parametrize("model_type", ["blip_2_qformer", "instructblip_qformer"])
def test_tensors_round_trip_bitwise(model_type):
    hf = build_qformer(model_type, use_qformer_text_input=True, seed=6)
    state = _state(hf)
    _, params = _convert(hf)
    back = qformer_hf.params_to_hf(params, prefix="qformer.")
    assert sorted(back) == sorted(f"qformer.{k}" for k in state)
    for k, v in state.items():
        assert back[f"qformer.{k}"].dtype == v.dtype
        assert np.array_equal(back[f"qformer.{k}"], v), k


def test_blip2_without_text_input_has_no_text_feed_forward():
    hf = build_qformer("blip_2_qformer")
    names = set(_state(hf))
    assert not any(re.search(r"layer\.\d+\.(intermediate|output)\.", k) for k in names)
    assert "encoder.layer.1.output_query.dense.weight" in names
    assert "encoder.layer.1.crossattention.attention.key.weight" not in names
    q, params = _convert(hf)  # a full match: no key missing or left over
    text = jnp.zeros((1, QUERIES + 2, 32))
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        QFormerModel(q).apply({"params": params}, text, jnp.zeros((1, 3, 24)),
                              query_length=QUERIES)


def test_mismatched_tensors_are_named():
    hf = build_qformer("blip_2_qformer")
    state = _state(hf)
    q = qformer_hf.qformer_from_hf(hf.config.to_dict(), num_query_tokens=QUERIES)
    abstract = qformer_hf.abstract_qformer_params(q)
    del state["encoder.layer.2.crossattention.attention.key.weight"]
    state["encoder.layer.1.crossattention.attention.key.weight"] = np.zeros((32, 24))
    state["layernorm.bias"] = np.zeros(16, np.float32)
    with pytest.raises(ValueError) as err:
        qformer_hf.params_from_hf(state, abstract)
    msg = str(err.value)
    assert "missing encoder.layer.2.crossattention.attention.key.weight" in msg
    assert "unexpected encoder.layer.1.crossattention.attention.key.weight" in msg
    assert "layernorm.bias has shape [16]" in msg


@pytest.mark.parametrize("config_cls", [Blip2QFormerConfig, InstructBlipQFormerConfig])
def test_config_mapping(config_cls):
    # Our defaults are transformers' (HF writes only the fields that differ from them).
    ours = qformer_hf.qformer_from_hf({"model_type": config_cls.model_type})
    assert qformer_hf.qformer_to_hf(ours) == {
        k: v for k, v in config_cls().to_dict().items() if k in qformer_hf.qformer_to_hf(ours)}
    hf = config_cls(**{k: v for k, v in build_qformer(config_cls.model_type).config
                       .to_dict().items() if k != "model_type"})
    q = qformer_hf.qformer_from_hf(hf.to_dict(), num_query_tokens=9, encoder_hidden_size=40)
    assert (q.num_query_tokens, q.encoder_hidden_size, q.layer_norm_eps) == (9, 40, 1e-6)
    again = config_cls(**{k: v for k, v in qformer_hf.qformer_to_hf(q).items()
                          if k != "model_type"})
    assert again.to_dict() == {**hf.to_dict(), "encoder_hidden_size": 40}


def test_bad_config_values_are_refused():
    with pytest.raises(models.InvalidConfigError, match="num_attention_heads = 5"):
        qformer_hf.qformer_from_hf({"hidden_size": 32, "num_attention_heads": 5})
    with pytest.raises(models.UnsupportedModelError, match="relative_key"):
        qformer_hf.qformer_from_hf({"position_embedding_type": "relative_key"})
    with pytest.raises(models.InvalidConfigError, match="cross_attention_frequency = 0"):
        qformer_hf.qformer_from_hf({"cross_attention_frequency": 0})


def test_registered_with_one_token_per_query():
    from mllm_jax.models.registry import CONNECTORS
    spec = CONNECTORS.get("qformer")
    cfg = _connector_cfg(spec.config(num_query_tokens=QUERIES))
    assert spec.tokens_out(cfg, 577) == QUERIES
    assert spec.module is QFormerConnector


def test_attention_dropout_path_is_the_same_attention():
    """Training mode computes attention explicitly (to drop probabilities); with a
    vanishing rate it must give the inference path's output, and with rate 0.5 it must not."""
    hf = build_qformer("blip_2_qformer", use_qformer_text_input=True, seed=7)
    q, params = _convert(hf)
    queries, image = _inputs(seed=7)
    mask = jnp.asarray(np.array([[1] * QUERIES, [1] * (QUERIES - 2) + [0, 0]]))

    def run(rate, deterministic):
        cfg = q.copy_and_resolve_references()
        cfg.update(attention_probs_dropout_prob=rate, hidden_dropout_prob=0.0)
        return QFormerModel(cfg).apply({"params": params}, jnp.asarray(queries),
                                       jnp.asarray(image), attention_mask=mask,
                                       deterministic=deterministic,
                                       rngs={"dropout": jax.random.PRNGKey(1)})
    reference = run(0.0, True)
    assert float(jnp.max(jnp.abs(run(1e-9, False) - reference))) <= 1e-5
    assert float(jnp.max(jnp.abs(run(0.5, False) - reference))) > 1e-2


def test_as_the_connector_of_a_llava_model():
    """Query tokens replace the patch tokens: the model, the pipeline and generation all
    ask `tokens_per_image`, which is num_query_tokens; the config survives JSON."""
    import mllm_jax
    from mllm_jax import config as mc, presets
    from mllm_jax.models.connectors.qformer import qformer_config
    projector = qformer_config(num_query_tokens=4, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=48,
                               encoder_hidden_size=32)
    cfg = mc.llava_config(vision=presets.tiny_clip(), text=presets.tiny_llama(),
                          projector=projector, image_token_index=255)
    assert models.tokens_per_image(cfg) == 4
    assert mc.config_from_json(cfg.to_json()).to_dict() == cfg.to_dict()
    model = mllm_jax.build_model(cfg)
    pixels, _ = _pixels()
    # The encoder and the connector only (the LLM is not needed for image features), with
    # random weights of std 0.1 around 0 (norm scales: around 1), drawn in numpy: compiling
    # the initializers would take longer.
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x,
                                                 method="image_features"), pixels)["params"]
    shapes = nn.meta.unbox(shapes)
    assert shapes["multi_modal_projector"]["query_tokens"].shape == (1, 4, 32)
    assert "layer_1" in shapes["multi_modal_projector"]["qformer"]["encoder"]
    rng = np.random.RandomState(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (float(path[-1].key == "scale") + 0.1 * rng.standard_normal(s.shape))
        .astype(np.float32), shapes)
    feats = jax.jit(lambda p, x: model.apply({"params": p}, x, method="image_features"))(
        params, jnp.asarray(pixels))
    assert feats.shape == (2, 4, 64)
    assert float(jnp.max(jnp.abs(feats[0] - feats[1]))) > 1e-2  # each image its own


def _pixels():
    from hf_factories import random_pixels
    return random_pixels(2, 28)


def test_every_parameter_has_logical_axes():
    q = qformer_hf.qformer_from_hf({"model_type": "instructblip_qformer", "hidden_size": 32,
                                    "num_attention_heads": 4, "intermediate_size": 48,
                                    "num_hidden_layers": 2, "encoder_hidden_size": 24},
                                   num_query_tokens=QUERIES)
    connector = QFormerConnector(_connector_cfg(q))
    boxed = jax.eval_shape(connector.init, jax.random.PRNGKey(0),
                           jnp.zeros((1, 3, 24)))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    specs = sharding.param_specs(boxed)
    layer = specs["qformer"]["encoder"]["layer_0"]
    assert layer["crossattention"]["attention"]["key"]["kernel"] == P("fsdp", "tensor")
    assert layer["intermediate"]["dense"]["kernel"] == P("fsdp", "tensor")
    assert specs["qformer"]["embeddings"]["word_embeddings"]["embedding"] == P("tensor", "fsdp")
    assert specs["query_tokens"] == P(None, None, "fsdp")


def test_flop_count_matches_xla():
    """The registered FLOP count (matmuls) against XLA's count of the compiled connector,
    which adds the element-wise work (norms, softmax, GELU): a few percent at these sizes.
    A missing or doubled term (e.g. the cross-attention's key/value projections, ~9%)
    falls outside."""
    from mllm_jax.models.connectors.qformer import forward_flops, qformer_config
    q = qformer_config(num_query_tokens=32, hidden_size=256, num_hidden_layers=3,
                       num_attention_heads=4, intermediate_size=1024, encoder_hidden_size=128)
    cfg = _connector_cfg(q, text_hidden=192)
    connector = QFormerConnector(cfg)
    features = jnp.zeros((1, 64, 128))
    params = jax.eval_shape(connector.init, jax.random.PRNGKey(0), features)
    cost = jax.jit(connector.apply).lower(params, features).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert 1.0 <= cost["flops"] / forward_flops(cfg, 64, 128) <= 1.06
