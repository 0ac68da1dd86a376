"""BLIP-2's EVA ViT (`vision.type = "eva"`) as a configuration of the shared ViT: parity with
transformers' Blip2VisionModel and InstructBlipVisionModel, the HF tensor-name mapping both
ways, its config mapping, FLOPs and logical axes, and the tower composed under LLaVA."""
import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from transformers import (Blip2VisionConfig, Blip2VisionModel, InstructBlipVisionConfig,
                          InstructBlipVisionModel)

from hf_factories import randomize_extras_, random_pixels
from mllm_jax import config as mc
from mllm_jax import models, sharding
from mllm_jax.convert import hf_keys
from mllm_jax.models.encoders import eva
from mllm_jax.models.registry import ENCODERS, InvalidConfigError, UnsupportedModelError
from mllm_jax.models.vit import VisionTransformer

HF_CLASSES = {"blip_2_vision_model": (Blip2VisionConfig, Blip2VisionModel),
              "instructblip_vision_model": (InstructBlipVisionConfig, InstructBlipVisionModel)}
# Non-default where it matters: eps, image size (3x3 patches), activation stays exact GELU.
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            image_size=42, patch_size=14, layer_norm_eps=1e-5, initializer_range=0.1)


def tower_cfg(vision, **kw):
    """A composed-model-shaped config holding only what the tower reads."""
    c = ml_collections.ConfigDict({"vision": vision})
    mc.runtime_fields(c)
    c.update(kw)
    return c


def build_hf(model_type, seed=0):
    config_cls, model_cls = HF_CLASSES[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**TINY))
    # Every bias (the whole fused qkv bias, k part included) and norm scale random.
    return randomize_extras_(model, seed=seed + 1).eval()


def params_from_state_dict(state_dict, abstract):
    """Our parameter tree from HF tensors, by the converter's name and layout rules."""
    flat = flax.traverse_util.flatten_dict(abstract)
    out = {}
    for path, leaf in flat.items():
        tensor = state_dict.pop(hf_keys.hf_name(path)).numpy()
        out[path] = jnp.asarray(hf_keys.from_hf_layout(path, tensor))
        assert out[path].shape == leaf.shape, path
    assert not state_dict, f"HF tensors with no parameter: {sorted(state_dict)}"
    return flax.traverse_util.unflatten_dict(out)


def state_dict_from_params(params):
    return {hf_keys.hf_name(path): torch.from_numpy(np.array(hf_keys.to_hf_layout(path, leaf)))
            for path, leaf in flax.traverse_util.flatten_dict(params).items()}


@pytest.fixture(scope="module", params=sorted(HF_CLASSES))
def hf_pair(request):
    """(HF model, our tower config, params mapped from the HF state dict)."""
    model = build_hf(request.param)
    vision = eva.vision_from_hf(model.config.to_diff_dict(), "tiny config")
    cfg = tower_cfg(vision)
    tower = eva.EvaVisionTower(cfg)
    abstract = nn.meta.unbox(jax.eval_shape(tower.init, jax.random.PRNGKey(0),
                                            jnp.zeros((1, 42, 42, 3)))["params"])
    params = params_from_state_dict(dict(model.state_dict()), abstract)
    return model, cfg, params


def test_parity_with_transformers(hf_pair):
    model, cfg, params = hf_pair
    nhwc, nchw = random_pixels(2, 42, seed=3)
    with torch.no_grad():
        ref = model(pixel_values=nchw, output_hidden_states=True)
    ours = jax.jit(VisionTransformer(cfg.vision).apply)({"params": params}, nhwc)
    feats = jax.jit(eva.EvaVisionTower(cfg).apply)({"params": params}, nhwc)
    assert feats.shape == (2, 10, 32) == ref.last_hidden_state.shape
    last = ref.last_hidden_state.numpy()
    assert np.max(np.abs(np.asarray(feats) - last)) <= 1e-5
    assert np.max(np.abs(np.asarray(ours["last_hidden_state"]) - last)) <= 1e-5
    assert np.max(np.abs(np.asarray(ours["pooler_output"]) - ref.pooler_output.numpy())) <= 1e-5
    assert len(ours["hidden_states"]) == len(ref.hidden_states) == 3
    for a, b in zip(ours["hidden_states"], ref.hidden_states):
        assert np.max(np.abs(np.asarray(a) - b.numpy())) <= 1e-5
    # The features are post-LayerNormed: the last layer's raw output differs from them.
    assert np.max(np.abs(np.asarray(ours["hidden_states"][-1]) - last)) > 0.1


def test_parity_at_another_resolution(hf_pair):
    """Position embeddings resized (bicubic, as torch) for a 56 px image, as HF's
    `interpolate_pos_encoding=True`."""
    model, cfg, params = hf_pair
    nhwc, nchw = random_pixels(2, 56, seed=4)
    with torch.no_grad():
        ref = model(pixel_values=nchw, interpolate_pos_encoding=True).last_hidden_state
    feats = jax.jit(eva.EvaVisionTower(cfg).apply)({"params": params}, nhwc)
    assert feats.shape == (2, 17, 32) == ref.shape
    assert eva.tokens_per_image(cfg, (56, 56)) == 17
    assert np.max(np.abs(np.asarray(feats) - ref.numpy())) <= 1e-5


def test_hf_names_round_trip(hf_pair):
    """Our parameters, written under HF names in HF's layouts, load strictly into the HF
    model and give the same output; mapped back they are bitwise ours."""
    model, cfg, _ = hf_pair
    tower = eva.EvaVisionTower(cfg)
    abstract = jax.eval_shape(tower.init, jax.random.PRNGKey(7), jnp.zeros((1, 42, 42, 3)))
    rng = np.random.RandomState(7)  # every leaf random: no zero biases or unit scales
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape).astype(np.float32)),
        nn.meta.unbox(abstract)["params"])
    state = state_dict_from_params(params)
    fresh = type(model)(model.config).eval()
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    nhwc, nchw = random_pixels(2, 42, seed=5)
    with torch.no_grad():
        ref = fresh(pixel_values=nchw).last_hidden_state.numpy()
    assert np.max(np.abs(np.asarray(jax.jit(tower.apply)({"params": params}, nhwc)) - ref)) <= 1e-5
    back = params_from_state_dict({k: v.clone() for k, v in fresh.state_dict().items()},
                                  params)
    for path, leaf in flax.traverse_util.flatten_dict(params).items():
        np.testing.assert_array_equal(np.asarray(leaf),
                                      np.asarray(flax.traverse_util.flatten_dict(back)[path]))


def test_parameter_names_are_hf_names(hf_pair):
    _, _, params = hf_pair
    names = {hf_keys.hf_name(p) for p in flax.traverse_util.flatten_dict(params)}
    assert {"embeddings.class_embedding", "embeddings.position_embedding",
            "embeddings.patch_embedding.bias", "encoder.layers.1.self_attn.qkv.weight",
            "encoder.layers.1.self_attn.qkv.bias", "encoder.layers.1.self_attn.projection.bias",
            "post_layernorm.weight"} <= names
    assert not any("pre_layrnorm" in n or "k_proj" in n for n in names)
    assert params["embeddings"]["position_embedding"].shape == (1, 10, 32)
    assert params["embeddings"]["class_embedding"].shape == (1, 1, 32)


@pytest.mark.parametrize("model_type", sorted(HF_CLASSES))
def test_defaults_equal_transformers(model_type):
    hf = HF_CLASSES[model_type][0]()
    for key, value in eva.VISION_DEFAULTS.items():
        assert getattr(hf, key) == value, key
    ours = eva.vision_from_hf({"model_type": model_type})
    assert ours == ENCODERS.get("eva").config()
    assert eva.vision_to_hf(ours, model_type) == {"model_type": model_type,
                                                  **eva.VISION_DEFAULTS}
    # to_hf output is what HF reads back.
    back = HF_CLASSES[model_type][0](**eva.vision_to_hf(ours.copy_and_resolve_references()))
    assert back.to_dict()["hidden_size"] == 1408


def test_from_hf_reads_non_defaults_and_round_trips():
    hf = {"model_type": "instructblip_vision_model", **TINY, "qkv_bias": False}
    v = eva.vision_from_hf(hf)
    assert (v.type, v.image_size, v.layer_norm_eps, v.qkv_bias) == ("eva", 42, 1e-5, False)
    assert eva.vision_from_hf(eva.vision_to_hf(v)) == v


def test_qkv_bias_false_matches_transformers():
    torch.manual_seed(0)
    model = randomize_extras_(Blip2VisionModel(Blip2VisionConfig(**TINY, qkv_bias=False)),
                              seed=2).eval()
    cfg = tower_cfg(eva.vision_from_hf(model.config.to_diff_dict()))
    tower = eva.EvaVisionTower(cfg)
    abstract = nn.meta.unbox(jax.eval_shape(tower.init, jax.random.PRNGKey(0),
                                            jnp.zeros((1, 42, 42, 3)))["params"])
    params = params_from_state_dict(dict(model.state_dict()), abstract)
    assert "bias" not in params["encoder"]["layers_0"]["self_attn"]["qkv"]
    nhwc, nchw = random_pixels(2, 42, seed=6)
    with torch.no_grad():
        ref = model(pixel_values=nchw).last_hidden_state.numpy()
    assert np.max(np.abs(np.asarray(jax.jit(tower.apply)({"params": params}, nhwc)) - ref)) <= 1e-5


@pytest.mark.parametrize("field,value,message", [
    ("num_attention_heads", 5, "num_attention_heads = 5 does not divide hidden_size"),
    ("patch_size", 13, "patch_size = 13 does not divide image_size"),
    ("layer_norm_eps", 0, "layer_norm_eps = 0"),
    ("hidden_act", "swiglu", "hidden_act = 'swiglu'"),
    ("num_hidden_layers", 0, "num_hidden_layers = 0"),
])
def test_check_names_the_field(field, value, message):
    v = eva.eva_vision_config(**{field: value})
    with pytest.raises(InvalidConfigError, match=message):
        ENCODERS.get("eva").check(v, "vision")
    with pytest.raises(InvalidConfigError, match=f"cfg.json vision_config: {message}"):
        eva.vision_from_hf({field: value}, "cfg.json vision_config")


def test_from_hf_rejects_other_towers_and_to_hf_other_layouts():
    with pytest.raises(UnsupportedModelError, match="clip_vision_model"):
        eva.vision_from_hf({"model_type": "clip_vision_model"})
    with pytest.raises(UnsupportedModelError, match="pre_layernorm = True"):
        eva.vision_to_hf(eva.eva_vision_config(pre_layernorm=True))
    with pytest.raises(UnsupportedModelError, match="CLIPVisionModel"):
        ENCODERS.get("clip").to_hf(eva.eva_vision_config())


def test_every_parameter_has_logical_axes():
    cfg = tower_cfg(eva.eva_vision_config(**{k: TINY[k] for k in TINY
                                              if k != "initializer_range"}))
    boxed = jax.eval_shape(eva.EvaVisionTower(cfg).init, jax.random.PRNGKey(0),
                           jnp.zeros((1, 42, 42, 3)))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    specs = sharding.param_specs(boxed)  # raises on a logical name without a rule
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(boxed))
    known = {name for name, _ in sharding.LOGICAL_RULES}
    for path, box in flax.traverse_util.flatten_dict(
            boxed, is_leaf=lambda _, x: isinstance(x, nn.Partitioned)).items():
        assert len(box.names) == flat[path].ndim, path
        assert all(n is None or n in known for n in box.names), (path, box.names)
    assert jax.tree_util.tree_leaves(specs)


def test_flops_match_xla():
    v = eva.eva_vision_config(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                              num_attention_heads=4, image_size=56, patch_size=14)
    cfg = tower_cfg(v)
    tower = eva.EvaVisionTower(cfg)
    pixels = jnp.zeros((1, 56, 56, 3))
    params = jax.eval_shape(tower.init, jax.random.PRNGKey(0), pixels)
    cost = jax.jit(tower.apply).lower(params, pixels).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert 1.0 <= cost["flops"] / ENCODERS.get("eva").flops(cfg) <= 1.06
    assert ENCODERS.get("eva").feature_size(cfg) == 256
    assert ENCODERS.get("eva").tokens_per_image(cfg) == 17


def _tiny_llava(**kw):
    from mllm_jax import presets
    vision = eva.eva_vision_config(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, image_size=28, patch_size=14)
    return mc.llava_config(vision=vision, text=presets.tiny_llama(), image_token_index=255,
                           image_seq_length=4, **kw)


@pytest.fixture(scope="module")
def llava_params():
    cfg = _tiny_llava()
    model = models.build_model(cfg)
    inputs = models.init_inputs(cfg)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]
    assert "qkv" in abstract["vision_tower"]["encoder"]["layers_0"]["self_attn"]
    rng = np.random.RandomState(0)
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape).astype(np.float32)),
        nn.meta.unbox(abstract))


@pytest.mark.parametrize("strategy,layer,tokens", [("default", -2, 4), ("full", -1, 5)])
def test_composes_under_llava(llava_params, strategy, layer, tokens):
    """The encoder is a config choice: LLaVA with an EVA tower builds, allocates nothing
    under eval_shape, and runs; LLaVA's layer selection applies as with `clip`."""
    cfg = _tiny_llava(vision_feature_select_strategy=strategy, vision_feature_layer=layer)
    models.check_config(cfg)
    assert models.tokens_per_image(cfg) == tokens
    model, params = models.build_model(cfg), llava_params
    ids = jnp.array([[1] + [255] * tokens + [5, 6]])
    pixels = jnp.asarray(random_pixels(1, 28)[0])
    if strategy == "default":
        logits = jax.jit(model.apply)({"params": params}, ids, pixel_values=pixels)
        assert logits.shape == (1, tokens + 3, 256) and bool(jnp.isfinite(logits).all())
    # The selected features are the chosen layers' outputs, not the post-LayerNormed state.
    feats = jax.jit(lambda p, x: model.apply(p, x, method=model.vision_features))(
        {"params": params}, pixels)
    hidden = jax.jit(VisionTransformer(cfg.vision).apply)(
        {"params": params["vision_tower"]}, pixels)["hidden_states"]
    layers = [layer] if isinstance(layer, int) else layer
    want = np.concatenate([np.asarray(hidden[i])[:, 0 if strategy == "full" else 1:]
                           for i in layers], -1)
    np.testing.assert_allclose(np.asarray(feats), want, atol=1e-6)
    assert ENCODERS.get("eva").feature_size(cfg) == 32 * len(layers)


def test_encoder_spec_is_complete():
    spec = ENCODERS.get("eva")
    missing = [f.name for f in dataclasses.fields(spec) if getattr(spec, f.name) is None]
    assert not missing
