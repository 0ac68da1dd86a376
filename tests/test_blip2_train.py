"""BLIP-2 stage 2 / InstructBLIP tuning through the trainer: the `blip2` family trains with
the `lm` objective, only the Q-Former side (query tokens, Q-Former, projection) moves, the
export reloads to the same parameters; the recipes carry the published settings."""
import os

import flax
import jax
import numpy as np
import pytest

import mllm_jax
from mllm_jax.models.blip2 import blip2_config
from mllm_jax.models.connectors.qformer import qformer_config
from mllm_jax.models.decoders.opt import opt_text_config
from mllm_jax.models.encoders.eva import eva_vision_config
from mllm_jax.train import blip2_stages, config_file, recipe
from mllm_jax.train.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_blip2_opt():
    vision = eva_vision_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, image_size=28, patch_size=14)
    text = opt_text_config(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                           num_attention_heads=4, max_position_embeddings=64,
                           word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    qformer = qformer_config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=48, num_query_tokens=4, encoder_hidden_size=32,
                             vocab_size=64, max_position_embeddings=16)
    return blip2_config("blip2", vision=vision, text=text, projector=qformer,
                        image_token_index=127)


def test_blip2_stage2_trains_only_the_qformer_side_and_the_export_reloads(tmp_path):
    c = recipe.base("tiny-llava")
    c.model = tiny_blip2_opt()
    c.stage.update(name="blip2_stage2", trainable=[blip2_stages.QFORMER])
    c.train.update(global_batch_size=4, num_steps=3, lr=1e-2, warmup_ratio=0.0, log_every=1,
                   checkpoint_every=10, async_checkpointing=False)
    c.data.text_len = 12
    c.mesh.update(data=1, fsdp=1, tensor=1)
    model = mllm_jax.build_model(c.model)
    init = flax.linen.meta.unbox(model.init(jax.random.PRNGKey(0),
                                            *mllm_jax.models.init_inputs(c.model))["params"])
    mllm_jax.save_orbax(model, init, str(tmp_path / "init"))
    c.init.orbax_checkpoint = str(tmp_path / "init")
    summary = train(c, str(tmp_path / "run"), log=lambda *_: None, devices=jax.devices()[:1])
    assert summary["step"] == 3 and all(np.isfinite(summary["losses"]))
    params = jax.device_get(summary["final_params"])
    flat_init = {k: np.asarray(v) for k, v in
                 flax.traverse_util.flatten_dict(jax.device_get(init), sep="/").items()}
    flat = {k: np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(params, sep="/").items()}
    assert sorted(flat) == sorted(flat_init)
    moved = {k for k in flat if not np.array_equal(flat[k], flat_init[k])}
    trainable = {k for k in flat if k == "query_tokens"
                 or k.startswith(("qformer/", "language_projection/"))}
    assert moved and moved <= trainable, sorted(moved - trainable)
    assert any(k.startswith("language_projection/") for k in moved)
    # The vision tower and the LLM are bitwise where they started.
    for k in flat:
        if k.startswith(("vision_model/", "language_model/")):
            np.testing.assert_array_equal(flat[k], flat_init[k], err_msg=k)
    loaded_model, loaded = mllm_jax.load_orbax(str(tmp_path / "run" / "final"))
    assert loaded_model.cfg.model_type == "blip2"
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_blip2_stage2_and_instructblip_recipes_carry_the_published_settings():
    s2 = config_file.load(os.path.join(REPO, "configs", "blip2_opt_stage2.py"))
    assert s2.model.model_type == "blip2" and s2.model.text.model_type == "opt"
    assert (s2.train.lr, s2.train.warmup_steps, s2.train.end_lr_ratio) == (1e-4, 2000, 0.5)
    assert (s2.train.b1, s2.train.b2, s2.train.weight_decay) == (0.9, 0.98, 0.05)
    assert (s2.train.global_batch_size, s2.train.num_steps) == (1920, 80_000)
    ib = config_file.load(os.path.join(REPO, "configs", "instructblip_vicuna7b.py"))
    assert ib.model.model_type == "instructblip" and ib.model.text.model_type == "llama"
    assert (ib.train.lr, ib.train.warmup_steps, ib.train.end_lr_ratio) == (1e-5, 1000, 0.0)
    assert (ib.train.b2, ib.train.weight_decay, ib.train.global_batch_size) == (0.999, 0.05,
                                                                                128)
    for c in (s2, ib):
        assert c.stage.trainable == [blip2_stages.QFORMER] and c.stage.objective == "lm"
    with pytest.raises(ValueError, match=r"encoder-decoder LLM \(t5\)"):
        blip2_stages.blip2_stage2("blip2-flan-t5-xl")
