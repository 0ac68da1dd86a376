"""One answer to "how many tokens does an image become": the model's features, the training
pipeline's expansion of `<image>`, synthetic batches, generation's check and the FLOP counter
all agree with `models.tokens_per_image`, for LLaVA's `default` (CLS dropped) and `full`
(CLS kept) feature strategies."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import mllm_jax
from mllm_jax import models
from mllm_jax.data.sources import make_data
from mllm_jax.data.synthetic import SyntheticSource
from mllm_jax.data.tokenizer import load_tokenizer
from mllm_jax.infer.generate import generate
from mllm_jax.train import flops as flops_lib
from mllm_jax.train import recipe
from test_templates import make_hf


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_hf(str(tmp_path_factory.mktemp("tok")), "bytelevel")


def _train_config(strategy, tokenizer_dir, tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(image)
    records = [{"id": f"s{i}", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A grey picture."}]} for i in range(2)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    c = recipe.base("tiny-llava")
    c.model.vision_feature_select_strategy = strategy
    c.model.image_token_index = load_tokenizer(tokenizer_dir).image_token_id
    c.train.global_batch_size = 2
    c.data.update(source="llava_json", json=str(tmp_path / "data.json"),
                  image_root=str(tmp_path), tokenizer=tokenizer_dir, max_length=96, workers=1)
    return c


@pytest.mark.parametrize("strategy,expected", [("default", 16), ("full", 17)])
def test_everyone_asks_the_model(strategy, expected, tokenizer_dir, tmp_path):
    cfg = _train_config(strategy, tokenizer_dir, tmp_path)
    m = cfg.model
    n = models.tokens_per_image(m)
    assert n == expected  # tiny-llava: 28 px / 7 px patches = 16, + CLS for "full"

    # The model's projected features.
    model = mllm_jax.build_model(m)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                                *models.init_inputs(m))["params"])
    pixels = jnp.zeros((3, m.vision.image_size, m.vision.image_size, 3))
    feats = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method="image_features"),
                           params, pixels)
    assert feats.shape[:2] == (3, n)

    # The training pipeline's expansion of <image>.
    data = make_data(cfg, 0, 1)
    batch = next(data)
    np.testing.assert_array_equal(np.sum(batch["input_ids"] == m.image_token_index, axis=1),
                                  [n, n])
    data.close()

    # Synthetic batches.
    synth = SyntheticSource(m, 2, 8, images_per_sample=2).global_batch(0)
    np.testing.assert_array_equal(np.sum(synth["input_ids"] == m.image_token_index, axis=1),
                                  [2 * n, 2 * n])

    # Generation accepts exactly that many image tokens per image.
    ids = np.array([[1] + [m.image_token_index] * n + [5, 6]], np.int32)
    generate(model, params, ids, pixel_values=pixels[:1], max_new_tokens=1, eos_token_id=2)
    with pytest.raises(ValueError, match="image tokens"):
        generate(model, params, np.delete(ids, 1, axis=1), pixel_values=pixels[:1],
                 max_new_tokens=1, eos_token_id=2)


def test_flop_counter_counts_the_model_tokens(tokenizer_dir, tmp_path):
    """Same sequence length, projector trained: `full` costs exactly one more token per
    image through the projector (forward + weight gradients) than `default`."""
    count = {}
    for strategy in ("default", "full"):
        m = _train_config(strategy, tokenizer_dir, tmp_path).model
        count[strategy] = flops_lib.train_step_flops(
            m, batch=4, seq=64, images_per_sample=2,
            trainable={"multi_modal_projector": {}})
    d_vis, d = m.vision.hidden_size, m.text.hidden_size
    per_token = 2 * d_vis * d + 2 * d * d  # mlp2x_gelu: two matmuls
    assert count["full"] - count["default"] == 4 * 2 * per_token * 2
