"""Qwen2-VL in the training step: batches of real images (`data.qwen2_vl_image`) carried row
by row (`qwen2_vl_vision.pad_rows`: patches [batch, bucket, C*T*P*P], grids [batch,
bucket / merge**2, 3]) compile one step per patch bucket, and each step's loss and gradients
equal the unbucketed computation (HF's flattened patches, unpadded, in a fresh jit)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from flax.core import meta

import mllm_jax
from mllm_jax.data import qwen2_vl_image as qimg
from mllm_jax.models import registry
from mllm_jax.models.qwen2_vl import qwen2_vl_config, qwen2_vl_text_config, qwen2_vl_vision_config
from mllm_jax.models.qwen2_vl_vision import flatten_rows, pad_patches, pad_rows, patch_bucket
from mllm_jax.train import partition
from mllm_jax.train import step as step_lib
from mllm_jax.train.losses import IGNORE_INDEX
from mllm_jax.train.objectives import LanguageModeling

IMAGE, VSTART, VEND, BOS = 120, 118, 119, 1
SEQ = 48
# A few parameters whose gradients are compared: the tower's input and merger, the decoder.
ERRORS = {}
WATCHED = ("visual/patch_embed/proj/weight", "visual/blocks_0/attn/qkv/kernel",
           "visual/merger/mlp/0/kernel", "model/embed_tokens/embedding")


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    for case, err in sorted(ERRORS.items()):
        print(f"  bucketed - unbucketed {case:<8} {err:.3e}")


def tiny_config():
    vision = qwen2_vl_vision_config(depth=1, embed_dim=32, hidden_size=64, num_heads=4,
                                    mlp_ratio=2, patch_size=4, spatial_merge_size=2,
                                    temporal_patch_size=2, min_pixels=8 * 8 * 2,
                                    max_pixels=8 * 8 * 24)
    text = qwen2_vl_text_config(vocab_size=128, hidden_size=64, intermediate_size=96,
                                num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=256,
                                mrope_section=[2, 3, 3], bos_token_id=BOS, eos_token_id=2)
    return qwen2_vl_config(vision=vision, text=text, image_token_id=IMAGE,
                           vision_start_token_id=VSTART, vision_end_token_id=VEND)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    model = mllm_jax.build_model(cfg)
    params = jax.jit(lambda rng: meta.unbox(model.init(rng, *registry.init_inputs(cfg))))(
        jax.random.PRNGKey(0))["params"]
    # A scale like a trained model's, so that the gradients are not tiny.
    params = jax.tree_util.tree_map(lambda x: x * 3.0 if x.ndim > 1 else x, params)
    return cfg, model, params


def image(h, w, seed):
    rng = np.random.default_rng([seed, h, w])
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def batch_of(cfg, rows_sizes, seed):
    """Rows of images of the given (h, w) sizes -> (row-by-row batch, HF-layout batch): BOS,
    text, each image as <vision_start> <image>*tokens <vision_end>, text with loss."""
    proc = qimg.Qwen2VLImageConfig.for_model(cfg)
    rs = np.random.RandomState(seed)
    ids = np.zeros((len(rows_sizes), SEQ), np.int32)
    labels = np.full_like(ids, IGNORE_INDEX)
    mask = np.zeros_like(ids)
    rows, flat = [], []
    for r, sizes in enumerate(rows_sizes):
        row = [qimg.preprocess(image(h, w, seed + k), proc) for k, (h, w) in enumerate(sizes)]
        tokens = [BOS] + list(rs.randint(3, 110, 2))
        for (h, w), (_, grid) in zip(sizes, row):
            n = registry.tokens_per_image(cfg, (h, w))
            assert n == grid[1] * grid[2] // 4
            tokens += [VSTART] + [IMAGE] * n + [VEND]
        prompt = len(tokens)
        tokens += list(rs.randint(3, 110, 6))
        assert len(tokens) <= SEQ
        ids[r, :len(tokens)] = tokens
        mask[r, :len(tokens)] = 1
        labels[r, prompt:len(tokens)] = tokens[prompt:]
        rows.append(row)
        flat += row
    pixel_values, grids = pad_rows(rows, cfg.vision)
    text = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    exact = {**text, "pixel_values": np.concatenate([p for p, _ in flat]),
             "image_grid_thw": np.stack([g for _, g in flat])}
    return {**text, "pixel_values": pixel_values, "image_grid_thw": grids}, exact


def make_step(model):
    return jax.jit(step_lib.make_train_step(model, LanguageModeling().loss, optax.sgd(1.0)))


def run(step, params, batch):
    trainable, frozen = partition.split(params, [".*"])
    state = step_lib.init_state(trainable, optax.sgd(1.0), jax.random.PRNGKey(1))
    new_state, metrics = step(state, frozen, {}, batch)
    before = traverse_util.flatten_dict(state.params, sep="/")
    after = traverse_util.flatten_dict(new_state.params, sep="/")
    grads = {k: np.asarray(before[k]) - np.asarray(after[k]) for k in WATCHED}
    return float(metrics["loss"]), float(metrics["grad_norm"]), grads


def test_flatten_rows_is_pad_patches_layout(setup):
    cfg, _, _ = setup
    batch, exact = batch_of(cfg, [[(40, 28)], [(24, 52), (20, 20)], []], seed=1)
    flat, grids = jax.jit(flatten_rows)(batch["pixel_values"], batch["image_grid_thw"])
    want, want_grids = pad_patches(exact["pixel_values"], exact["image_grid_thw"], cfg.vision)
    n = want.shape[0]
    np.testing.assert_array_equal(np.asarray(flat)[:n], want)
    assert not np.asarray(flat)[n:].any()
    g = np.asarray(grids)
    np.testing.assert_array_equal(g[:len(want_grids)], want_grids)
    assert not g[len(want_grids):].any()


def test_train_step_compiles_once_per_bucket_and_equals_unbucketed(setup):
    cfg, model, params = setup
    # Two batches whose rows' images differ in size but share the 64-patch bucket, then one
    # whose fullest row needs 128 patches.
    batches = [[[(24, 20)], [(16, 36), (12, 16)]],
               [[(28, 28)], [(20, 30), (16, 12)]],
               [[(40, 28)], [(20, 20)]]]
    buckets, traces = [], []
    train_step = step_lib.make_train_step(model, LanguageModeling().loss, optax.sgd(1.0))

    def traced_step(state, frozen, frozen_extra, batch):
        traces.append(batch["pixel_values"].shape)
        return train_step(state, frozen, frozen_extra, batch)

    step = jax.jit(traced_step)
    for k, rows in enumerate(batches):
        batch, exact = batch_of(cfg, rows, seed=10 * k)
        buckets.append(batch["pixel_values"].shape[1])
        assert patch_bucket(int(np.prod(batch["image_grid_thw"], -1).sum(-1).max()),
                            cfg.vision) == buckets[-1]
        loss, norm, grads = run(step, params, batch)
        # The same step without bucketing: HF's flattened patches, unpadded, fresh jit.
        ref_loss, ref_norm, ref_grads = run(make_step(model), params, exact)
        assert np.isfinite(loss) and loss > 0
        ERRORS[f"loss {k}"] = abs(loss - ref_loss)
        ERRORS[f"grads {k}"] = max(float(np.abs(grads[n] - ref_grads[n]).max()) for n in WATCHED)
        assert abs(loss - ref_loss) <= 1e-5, (k, loss, ref_loss)
        assert abs(norm - ref_norm) <= 1e-5 * max(1.0, ref_norm), (k, norm, ref_norm)
        for name in WATCHED:
            assert np.abs(ref_grads[name]).max() > 1e-6, name  # the gradient reaches it
            np.testing.assert_allclose(grads[name], ref_grads[name], atol=1e-5, rtol=0,
                                       err_msg=f"batch {k} {name}")
        assert step._cache_size() == (1 if k < 2 else 2), (k, buckets)
    assert buckets == [64, 64, 128]
    assert [s[1] for s in traces] == [64, 128]


def test_per_row_layout_logits_equal_hf_layout(setup):
    cfg, model, params = setup
    batch, exact = batch_of(cfg, [[(40, 28), (12, 16)], [(24, 52)]], seed=3)
    apply = jax.jit(lambda p, b: model.apply(
        {"params": p}, b["input_ids"], pixel_values=b["pixel_values"],
        image_grid_thw=b["image_grid_thw"], attention_mask=b["attention_mask"]))
    rows = apply(params, {k: jnp.asarray(v) for k, v in batch.items() if k != "labels"})
    flat = apply(params, {k: v for k, v in exact.items() if k != "labels"})
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(rows)[valid], np.asarray(flat)[valid], atol=1e-5)
