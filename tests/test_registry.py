"""A model family is a module plus a registration: a toy encoder (patch means through an MLP)
and a toy connector (average pooling to 4 tokens + a linear map), defined here and
registered through the public API, give a LLaVA-style model that trains, generates with the
KV cache and round-trips through an orbax checkpoint with no edit to the package."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import mllm_jax
from mllm_jax import config as mc
from mllm_jax import models, presets
from mllm_jax.infer.generate import generate
from mllm_jax.train import recipe
from mllm_jax.train.loop import train

POOLED = 4  # tokens per image after the toy connector


def patch_mean_config(**kw):
    c = ml_collections.ConfigDict({"type": "patch_mean", "image_size": 16, "num_channels": 3,
                                   "patch_size": 4, "hidden_size": 24})
    c.update(kw)
    return c


class PatchMeanEncoder(nn.Module):
    """Each patch's mean colour, then a 2-layer MLP: [n, h, w, c] -> [n, patches, d]."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, pixel_values):
        v = self.cfg.vision
        n, h, w, ch = pixel_values.shape
        p = v.patch_size
        x = pixel_values.reshape(n, h // p, p, w // p, p, ch).mean(axis=(2, 4))
        x = x.reshape(n, (h // p) * (w // p), ch)
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, "embed"))
        x = nn.gelu(nn.Dense(v.hidden_size, kernel_init=init, name="fc1")(x))
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None))
        return nn.Dense(v.hidden_size, kernel_init=init, name="fc2")(x)


class PoolConnector(nn.Module):
    """Average pooling of the tokens into POOLED groups, then one linear map."""

    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, x):
        n, t, d = x.shape
        x = x.reshape(n, POOLED, t // POOLED, d).mean(axis=2)
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                            ("vision_embed", "embed"))
        return nn.Dense(self.cfg.text.hidden_size, kernel_init=init, name="proj")(x)


def patches(cfg, image_size=None):
    h, w = image_size or (cfg.vision.image_size, cfg.vision.image_size)
    return (h // cfg.vision.patch_size) * (w // cfg.vision.patch_size)


def _register():
    models.register_encoder("patch_mean", models.EncoderSpec(
        module=PatchMeanEncoder, config=patch_mean_config, tokens_per_image=patches),
        replace=True)
    models.register_connector("pool4", models.ConnectorSpec(
        module=PoolConnector,
        config=lambda **kw: ml_collections.ConfigDict({"type": "pool4", **kw}),
        tokens_out=lambda cfg, tokens_in: POOLED), replace=True)


def toy_config():
    _register()
    cfg = mc.llava_config(vision=patch_mean_config(), text=presets.tiny_llama(),
                          projector=ml_collections.ConfigDict({"type": "pool4"}),
                          image_token_index=255)
    cfg.text.pad_token_id = 0
    return cfg


def test_a_registered_encoder_and_connector_train_generate_and_reload(tmp_path):
    model_cfg = toy_config()
    assert models.tokens_per_image(model_cfg) == POOLED and models.is_multimodal(model_cfg)

    c = recipe.base("tiny-llava")
    c.model = model_cfg
    c.stage.trainable = [recipe.VISION, recipe.PROJECTOR]
    c.train.update(global_batch_size=4, num_steps=3, lr=1e-2, warmup_ratio=0.0, log_every=1,
                   checkpoint_every=10, async_checkpointing=False)
    c.data.text_len = 8
    c.mesh.update(data=1, fsdp=1, tensor=1)
    init = mllm_jax.build_model(model_cfg).init(jax.random.PRNGKey(0),
                                                *models.init_inputs(model_cfg))["params"]
    init = nn.meta.unbox(init)
    summary = train(c, str(tmp_path / "run"), log=lambda *_: None,
                    devices=jax.devices()[:1])
    assert summary["step"] == 3 and all(np.isfinite(summary["losses"]))
    params = summary["final_params"]
    # The toy parts trained; the frozen LLM did not move.
    assert not np.allclose(params["vision_tower"]["fc1"]["kernel"],
                           init["vision_tower"]["fc1"]["kernel"])
    assert not np.allclose(params["multi_modal_projector"]["proj"]["kernel"],
                           init["multi_modal_projector"]["proj"]["kernel"])
    np.testing.assert_array_equal(params["language_model"]["model"]["norm"]["scale"],
                                  init["language_model"]["model"]["norm"]["scale"])

    # The exported run reloads with the registered parts, to the same logits.
    model, loaded = mllm_jax.load_orbax(str(tmp_path / "run" / "final"))
    assert model.cfg.vision.type == "patch_mean" and model.cfg.projector.type == "pool4"
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Greedy generation through the model's own KV cache equals the full forward's argmax
    # at every step: one causal forward over the prompt and the generated tokens gives, at
    # each position, the logits a forward cut there would give.
    rs = np.random.RandomState(0)
    pixels = rs.standard_normal((2, 16, 16, 3)).astype(np.float32)
    ids = np.array([[1, 7] + [255] * POOLED + [9, 11, 12],
                    [0, 0] + [1] + [255] * POOLED + [13, 14]], np.int32)
    mask = (np.arange(ids.shape[1])[None] >= np.array([[0], [2]])).astype(np.int32)
    new = generate(model, loaded, ids, mask, pixel_values=pixels, max_new_tokens=5,
                   eos_token_id=None)
    seq = np.concatenate([ids, new[:, :4]], axis=1)
    m = np.concatenate([mask, np.ones((2, 4), np.int32)], axis=1)
    positions = np.maximum(np.cumsum(m, axis=1) - 1, 0)
    logits = jax.jit(model.apply)({"params": loaded}, jnp.asarray(seq), jnp.asarray(pixels),
                                  jnp.asarray(m), position_ids=jnp.asarray(positions))
    np.testing.assert_array_equal(
        new[:, :5], np.asarray(jnp.argmax(logits[:, ids.shape[1] - 1:], axis=-1)))

    # No HF class exists for it: save_hf says so instead of writing something wrong.
    with pytest.raises(mllm_jax.UnsupportedModelError, match="pool4"):
        mllm_jax.save_hf(model, loaded, str(tmp_path / "hf"))


def test_unknown_parts_are_named_with_the_registered_ones():
    cfg = presets.get("tiny-llava")
    cfg.vision.type = "clipp"
    with pytest.raises(mllm_jax.UnsupportedModelError, match=r"'clipp'.*clip"):
        mllm_jax.build_model(cfg).init(jax.random.PRNGKey(0), *models.init_inputs(cfg))
    cfg = presets.get("tiny-llava")
    cfg.projector.type = "resampler"
    with pytest.raises(mllm_jax.UnsupportedModelError, match="mlp2x_gelu"):
        mllm_jax.build_model(cfg).init(jax.random.PRNGKey(0), *models.init_inputs(cfg))


def test_model_configs_written_before_part_types_existed_still_load():
    """Orbax exports carry their model config as JSON; one written before `vision.type`
    existed (no type field) reads as the CLIP tower it was, with every other value kept."""
    import json

    cfg = presets.get("tiny-llava")
    data = json.loads(cfg.to_json())
    del data["vision"]["type"]
    data["vision"]["image_size"] = 56
    again = mc.config_from_json(json.dumps(data))
    assert again.vision.type == "clip" and again.vision.image_size == 56
    assert again.projector.type == "mlp2x_gelu" and again.text.model_type == "llama"
    assert models.tokens_per_image(again) == (56 // 7) ** 2
