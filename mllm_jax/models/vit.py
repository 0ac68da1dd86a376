"""ViT encoders: OpenAI CLIP, and the knobs SigLIP / EVA variants need.

Paths mirror HF's `CLIPVisionModel`: `vision_model/embeddings/{patch_embedding,
class_embedding, position_embedding}`, `vision_model/pre_layrnorm`,
`vision_model/encoder/layers_{i}/...`, `vision_model/post_layernorm`.

BLIP-2's EVA ViT (HF `Blip2VisionModel`) is the same tower with `fused_qkv` (one
`self_attn/qkv` projection, its [3d] bias stored as HF stores it), `attn_out_name =
"projection"`, `patch_bias`, `embeddings_as_parameters` (`class_embedding` [1, 1, d],
`position_embedding` [1, n+1, d]), no pre LayerNorm and `post_layernorm_tokens`.

SigLIP (HF `SiglipVisionModel`) has no class token, a patch bias, `post_layernorm_tokens`,
and with `vision_use_head` the attention-pooling head under `head/` (`AttentionPoolingHead`).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax.models import attention
from mllm_jax.models.interpolate import interpolate_position_embedding
from mllm_jax.models.layers import Dense, Embed, LayerNorm, activation, dtype_of, with_axes
from mllm_jax.models.stack import LayerStack

ACT_AXES = ("activation_batch", "activation_length", "activation_embed")


class PatchEmbedding(nn.Module):
    """A stride-`patch` conv, computed as a matmul on flattened patches.

    kernel is in Flax conv layout [kh, kw, in, out] (torch stores [out, in, kh, kw])."""

    patch_size: int
    features: int
    use_bias: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, pixel_values):
        b, h, w, ch = pixel_values.shape
        p, d = self.patch_size, self.features
        kernel = self.param("kernel", with_axes(nn.initializers.normal(0.02),
                                                (None, None, None, "embed")),
                            (p, p, ch, d), self.param_dtype)
        gh, gw = h // p, w // p
        patches = pixel_values.astype(self.dtype).reshape(b, gh, p, gw, p, ch)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * ch)
        x = jnp.dot(patches, kernel.astype(self.dtype).reshape(p * p * ch, d))
        if self.use_bias:
            x = x + self.param("bias", with_axes(nn.initializers.zeros, ("embed",)), (d,),
                               self.param_dtype).astype(self.dtype)
        return x


class VisionEmbeddings(nn.Module):
    cfg: Any  # vision config
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, pixel_values):
        c = self.cfg
        _, h, w, ch = pixel_values.shape
        p = c.patch_size
        # SigLIP so400m/14 at 384 px: torch's "valid" conv leaves the last 384 % 14 rows and
        # columns out, and so do we; other towers ask for sides that patches tile.
        partial = c.get("drop_partial_patches", False)
        if ch != c.num_channels or (not partial and (h % p or w % p)) or h < p or w < p:
            raise ValueError(
                f"pixel_values must be NHWC with {c.num_channels} channels and sides divisible "
                f"by patch_size={p}; got shape {pixel_values.shape}")
        if partial:
            pixel_values = pixel_values[:, :h - h % p, :w - w % p]
        x = PatchEmbedding(p, c.hidden_size, c.patch_bias, self.dtype, self.param_dtype,
                           name="patch_embedding")(pixel_values)
        b = x.shape[0]
        prefix = 0
        # BLIP stores both as plain parameters with leading unit axes.
        lead = (1, 1) if c.embeddings_as_parameters else ()
        if c.use_class_token:
            cls = self.param("class_embedding", with_axes(nn.initializers.normal(0.02),
                                                          (None,) * len(lead) + ("embed",)),
                             lead + (c.hidden_size,), self.param_dtype)
            x = jnp.concatenate(
                [jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), x], axis=1)
            prefix = 1
        grid = c.image_size // p
        if c.embeddings_as_parameters:
            pos = self.param("position_embedding", with_axes(nn.initializers.normal(0.02),
                                                             (None, None, "embed")),
                             (1, prefix + grid * grid, c.hidden_size), self.param_dtype)[0]
        else:
            pos = Embed(prefix + grid * grid, c.hidden_size, axes=(None, "embed"),
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        name="position_embedding").embedding
        # Other resolutions: bicubic resize of the position grid, as torch does it.
        pos = interpolate_position_embedding(pos.astype(self.dtype), (grid, grid),
                                             (h // p, w // p), num_prefix_tokens=prefix)
        return x + pos[None]


class VisionMLP(nn.Module):
    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(c.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
        h = activation(c.hidden_act)(h)
        return Dense(c.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)


class VisionAttention(nn.Module):
    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, mask):
        c = self.cfg
        b, s, d = x.shape
        nh = c.num_attention_heads
        hd = d // nh
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if c.fused_qkv:
            # HF's fused [3d, d] Linear: output features ordered (q|k|v, head, head_dim).
            qkv = Dense(3 * d, ("embed", "heads"), c.qkv_bias, name="qkv", **kw)(x)
            q, k, v = (t[:, :, 0] for t in jnp.split(qkv.reshape(b, s, 3, nh, hd), 3, axis=2))
        else:
            split = lambda t: t.reshape(b, s, nh, hd)  # noqa: E731
            q, k, v = (split(Dense(d, ("embed", "heads"), c.qkv_bias, name=f"{n}_proj", **kw)(x))
                       for n in "qkv")
        out = attention.dot_product_attention(q, k, v, mask, scale=hd ** -0.5)
        return Dense(d, ("heads", "embed"), name=c.attn_out_name, **kw)(out.reshape(b, s, d))


class AttentionPoolingHead(nn.Module):
    """SigLIP's multihead attention pooling (HF `SiglipMultiheadAttentionPoolingHead`): a
    learned `probe` query attends over the tokens through torch's `nn.MultiheadAttention`,
    whose packed `in_proj_weight` [3d, d] (q|k|v rows, torch's [out, in] layout) and
    `in_proj_bias` [3d] are kept as torch stores them; then a LayerNorm and MLP residual.
    [n, tokens, d] -> [n, d]."""

    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        b, d = x.shape[0], x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        probe = self.param("probe", with_axes(nn.initializers.normal(1.0), (None, None, "embed")),
                           (1, 1, d), self.param_dtype)
        h = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))
        h = MultiheadAttention(c.num_attention_heads, name="attention", **kw)(h, x)
        h = h + VisionMLP(c, name="mlp", **kw)(
            LayerNorm(c.layer_norm_eps, name="layernorm", **kw)(h))
        return h[:, 0]


class MultiheadAttention(nn.Module):
    """torch `nn.MultiheadAttention(batch_first=True)` with its parameter names: query
    [n, q, d] attends over key_value [n, kv, d]."""

    num_heads: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, query, key_value):
        d = query.shape[-1]
        hd = d // self.num_heads
        w = self.param("in_proj_weight", with_axes(nn.initializers.normal(0.02),
                                                   ("heads", "embed")), (3 * d, d),
                       self.param_dtype).astype(self.dtype)
        bias = self.param("in_proj_bias", with_axes(nn.initializers.zeros, ("heads",)),
                          (3 * d,), self.param_dtype).astype(self.dtype)

        def project(x, k):
            y = jnp.einsum("bsd,ed->bse", x.astype(self.dtype),
                           w[k * d:(k + 1) * d]) + bias[k * d:(k + 1) * d]
            return y.reshape(*x.shape[:2], self.num_heads, hd)

        q, k, v = project(query, 0), project(key_value, 1), project(key_value, 2)
        mask = jnp.ones((1, 1, q.shape[1], k.shape[1]), bool)
        out = attention.dot_product_attention(q, k, v, mask, scale=hd ** -0.5)
        return Dense(d, ("heads", "embed"), name="out_proj", dtype=self.dtype,
                     param_dtype=self.param_dtype)(out.reshape(*query.shape[:2], d))


class VisionEncoderLayer(nn.Module):
    cfg: Any
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, mask):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + VisionAttention(c, name="self_attn", **kw)(
            LayerNorm(c.layer_norm_eps, name="layer_norm1", **kw)(x), mask)
        x = x + VisionMLP(c, name="mlp", **kw)(
            LayerNorm(c.layer_norm_eps, name="layer_norm2", **kw)(x))
        return nn.with_logical_constraint(x, ACT_AXES)


class VisionEncoder(nn.Module):
    cfg: Any
    dtype: Any
    param_dtype: Any
    scan_layers: bool = False
    remat_policy: str = "none"

    def setup(self):
        self.stack = LayerStack(
            VisionEncoderLayer, dict(cfg=self.cfg, dtype=self.dtype, param_dtype=self.param_dtype),
            self.cfg.num_hidden_layers, num_args=1, scan=self.scan_layers,
            remat_policy=self.remat_policy, collect=True)
        nn.share_scope(self, self.stack)

    def __call__(self, x, mask):
        return self.stack(x, mask)


class VisionTransformer(nn.Module):
    """Returns a dict: `hidden_states` (embeddings output then every layer's output, as HF's
    `output_hidden_states`), `last_hidden_state`, `pooler_output` (post-LayerNorm on CLS or
    mean of tokens; the attention-pooling head with `vision_use_head`)."""

    cfg: Any  # vision config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, pixel_values):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = VisionEmbeddings(c, name="embeddings", **kw)(pixel_values)
        if c.pre_layernorm:
            x = LayerNorm(c.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        x = nn.with_logical_constraint(x, ACT_AXES)
        mask = jnp.ones((1, 1, x.shape[1], x.shape[1]), bool)
        last, layer_outputs = VisionEncoder(c, scan_layers=self.scan_layers,
                                            remat_policy=self.remat_policy, name="encoder",
                                            **kw)(x, mask)
        post_ln = (LayerNorm(c.layer_norm_eps, name="post_layernorm", **kw)
                   if c.post_layernorm else lambda t: t)
        if c.post_layernorm_tokens:
            # BLIP: the last hidden state is normalised, and the pooled CLS of it again.
            last = post_ln(last)
        if c.get("vision_use_head", False):
            pooled = AttentionPoolingHead(c, name="head", **kw)(last)
        elif c.use_class_token or not c.post_layernorm_tokens:
            pooled = post_ln(last[:, 0] if c.use_class_token else last.mean(axis=1))
        else:
            pooled = None  # SigLIP without its head: HF's pooler_output is None
        return {"hidden_states": [x] + list(layer_outputs), "last_hidden_state": last,
                "pooler_output": pooled}


class VisionModel(nn.Module):
    """HF `CLIPVisionModel`: the transformer under `vision_model`."""

    cfg: Any  # model config with a `vision` section

    @nn.compact
    def __call__(self, pixel_values):
        c = self.cfg
        return VisionTransformer(c.vision, dtype_of(c.dtype), dtype_of(c.param_dtype),
                                 c.scan_layers, c.remat_policy,
                                 name="vision_model")(pixel_values)


def select_features(hidden_states, layers, keep_cls: bool, has_cls: bool):
    """LLaVA's feature selection: hidden_states[layer] (or several, concatenated on the feature
    axis), without the CLS token unless `keep_cls`."""
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    feats = [hidden_states[i] for i in layer_list]
    if has_cls and not keep_cls:
        feats = [f[:, 1:] for f in feats]
    return feats[0] if len(feats) == 1 else jnp.concatenate(feats, axis=-1)



def selects_layers(cfg) -> bool:
    """Whether a composed config asks for LLaVA's layer selection (`vision_feature_layer`)."""
    return cfg.get("vision_feature_layer") is not None


def vision_fields_from_hf(hf, where: str, defaults: dict, own_types: tuple, composite=None,
                          overrides=None, tower: str = "vision tower") -> tuple:
    """(fields, where) of a tower's HF vision config: `hf` is the tower's own config (its
    model_type one of `own_types`) or the whole `composite` model's (its `vision_config`
    read); absent fields take `defaults` (transformers'), then `overrides`. Raises naming
    `where` when `hf` is not a JSON object or names another model than `tower`."""
    from mllm_jax.models import checks
    from mllm_jax.models.registry import UnsupportedModelError
    if not isinstance(hf, dict):
        raise checks.InvalidConfigError(f"{where}: a vision config must be a JSON object, "
                                        f"not {hf!r}")
    model_type = hf.get("model_type", own_types[0])
    known = own_types + ((composite,) if composite else ())
    if model_type not in known:
        raise UnsupportedModelError(f"{where}: vision model_type {model_type!r} is not "
                                    f"{tower} (supported: {', '.join(known)})")
    if composite and model_type == composite:
        hf, where = hf.get("vision_config") or {}, f"{where} vision_config"
        if not isinstance(hf, dict):
            raise checks.InvalidConfigError(f"{where} must be a JSON object, not {hf!r}")
    d = dict(defaults)
    d.update(overrides or {})
    d.update({k: hf[k] for k in defaults if k in hf})
    return d, where
