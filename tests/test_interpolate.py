import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

from mllm_jax.models.interpolate import (
    bicubic_resize_matrix,
    interpolate_position_embedding,
    resize_bicubic_2d,
)

CASES = [
    ((16, 16), (24, 24)),
    ((24, 24), (16, 16)),
    ((7, 7), (10, 13)),
    ((3, 5), (8, 2)),
    ((1, 1), (4, 4)),
]


def _torch_bicubic(x_nhwc: np.ndarray, out_hw) -> np.ndarray:
    t = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
    y = F.interpolate(t, size=tuple(out_hw), mode="bicubic", align_corners=False)
    return y.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("in_hw,out_hw", CASES)
def test_resize_matches_torch(in_hw, out_hw):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *in_hw, 3)).astype(np.float32)
    ours = jax.jit(resize_bicubic_2d, static_argnums=1)(jnp.asarray(x), out_hw)
    assert ours.shape == (2, *out_hw, 3)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), _torch_bicubic(x, out_hw), rtol=0, atol=1e-5)


@pytest.mark.parametrize("in_size,out_size", [(16, 24), (24, 16), (7, 13), (5, 2), (1, 4), (4, 1)])
def test_matrix_matches_torch_on_basis(in_size, out_size):
    # Resizing the identity exposes the weight matrix itself, including clamped border taps.
    eye = torch.eye(in_size, dtype=torch.float64).reshape(in_size, 1, in_size, 1)
    ref = F.interpolate(eye, size=(out_size, 1), mode="bicubic", align_corners=False)
    ref = ref[:, 0, :, 0].T.numpy()
    mat = bicubic_resize_matrix(in_size, out_size)
    assert mat.shape == (out_size, in_size) and mat.dtype == np.float64
    np.testing.assert_allclose(mat, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(mat.sum(axis=1), 1.0, atol=1e-12)


def test_jax_image_resize_differs_from_torch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    ref = _torch_bicubic(x, (24, 24))
    theirs = jax.image.resize(jnp.asarray(x), (1, 24, 24, 4), method="bicubic")
    assert np.abs(np.asarray(theirs) - ref).max() > 1e-3


def test_position_embedding_matches_hf_clip():
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
    )
    emb = CLIPVisionEmbeddings(cfg).eval()
    height, width = 42, 56
    new_grid = (height // cfg.patch_size, width // cfg.patch_size)
    # HF only reads the patch count and hidden size from this tensor.
    patches = torch.zeros(1, 1 + new_grid[0] * new_grid[1], cfg.hidden_size)
    with torch.no_grad():
        ref = emb.interpolate_pos_encoding(patches, height, width)[0].numpy()
        table = emb.position_embedding.weight.numpy()

    grid = cfg.image_size // cfg.patch_size
    ours = interpolate_position_embedding(jnp.asarray(table), (grid, grid), new_grid)
    assert ours.shape == ref.shape == (1 + 6 * 8, 32)
    np.testing.assert_array_equal(np.asarray(ours[0]), table[0])
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-5)


def test_position_embedding_same_size_is_identity():
    table = jnp.asarray(np.random.default_rng(2).standard_normal((1 + 12, 8)), jnp.float32)
    assert interpolate_position_embedding(table, (3, 4), (3, 4)) is table
    # Even through the matmul path the weights at t = 0 are exactly [0, 1, 0, 0].
    np.testing.assert_array_equal(bicubic_resize_matrix(5, 5), np.eye(5))
