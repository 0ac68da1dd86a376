"""CLIP-style contrastive pre-training of our ViT on image-caption pairs.

The image tower is our CLIP vision model (`VisionModel`), so its trained parameters are a
`vision_tower` subtree LLaVA takes as it is. The text tower is a small causal LLaMA stack over
the caption tokens, pooled at the EOS token as CLIP pools its text. Both are projected
(no bias) to a joint space and L2-normalised; logits are exp(logit_scale) * cosine, with
logit_scale initialised to log(1 / 0.07) and kept <= log(100); the loss is the mean of the
image->text and text->image cross-entropies over the batch. With `loss="sigmoid"` it is
SigLIP's sigmoid loss instead (`pretrain.sigmoid_loss`): a learned `logit_bias` joins the
logits, scale and bias start at log(10) and -10.

Region-phrase pairs (`region_weight` > 0) add the same loss at the level of objects, as
RegionCLIP does: a region's feature is the mean of the ViT's patch tokens under its box (the
tokens of `region_layer`, the ones LLaVA feeds its projector), projected by
`region_projection`; it is contrasted with the phrases of the batch's regions (equal phrases
all count as matches). This teaches the patch tokens what each object is, which a
whole-image caption teaches only weakly.

    res = pretrain_contrastive("shapes/pairs_train.json", "shapes/tokenizer",
                               val="shapes/pairs_val.json")
    llava_params["vision_tower"] = res.vision_params
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mllm_jax import config as mc
from mllm_jax.data.image import CLIP_MEAN, CLIP_STD, preprocess_image
from mllm_jax.models.layers import dtype_of
from mllm_jax.models.llm import LlamaModel
from mllm_jax.models.vit import VisionModel
from mllm_jax.pretrain.sigmoid_loss import SIGMOID_BIAS_INIT, SIGMOID_SCALE_INIT, sigmoid_loss
from mllm_jax.train.optimizer import make_optimizer
from mllm_jax.train.optimizer import settings as optimizer_settings

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


def vision_model_config(image_size: int = 32, patch_size: int = 8, hidden_size: int = 64,
                        num_layers: int = 3, num_heads: int = 4) -> ml_collections.ConfigDict:
    """A tiny CLIP vision model config (`model_type` clip_vision) for the shapes world; its
    `vision` section is what a LLaVA config takes. (image_size / patch_size)^2 patches
    become the image tokens."""
    if patch_size <= 0 or image_size % patch_size:
        raise ValueError(f"image size {image_size} is not divisible by patch_size "
                         f"{patch_size}; choose a patch size that divides it (e.g. 8 or 4 "
                         f"for 32 px)")
    v = mc.vision_config(hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         image_size=image_size, patch_size=patch_size)
    return mc.clip_vision_model_config(v)


def text_tower_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2,
                      num_heads: int = 4, max_length: int = 32, tokenizer=None
                      ) -> ml_collections.ConfigDict:
    """A small LLaMA text config for the caption encoder."""
    if hidden_size % num_heads:
        raise ValueError(f"text hidden_size {hidden_size} is not divisible by {num_heads} heads")
    kw = {}
    if tokenizer is not None:
        kw = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    return mc.text_config(vocab_size=vocab_size, hidden_size=hidden_size,
                          intermediate_size=int(8 * hidden_size / 3) // 8 * 8,
                          num_hidden_layers=num_layers, num_attention_heads=num_heads,
                          num_key_value_heads=num_heads, head_dim=hidden_size // num_heads,
                          max_position_embeddings=max_length, **kw)


class ContrastiveModel(nn.Module):
    """Image and text towers with projections and a learnable logit scale.

    Parameters: `vision_tower` (a `VisionModel`, HF `CLIPVisionModel` layout), `text_model`
    (LLaMA layers), `visual_projection`, `text_projection`, `logit_scale`."""

    vision_cfg: Any  # clip_vision model config
    text_cfg: Any  # text config
    embed_dim: int = 64
    regions: bool = False  # adds `region_projection` and `region_logit_scale`
    region_layer: int = -1  # hidden_states index whose patch tokens regions pool
    loss: str = "softmax"  # a LOSSES name; "sigmoid" adds `logit_bias`

    def setup(self):
        self.vision_tower = VisionModel(self.vision_cfg)
        self.text_model = LlamaModel(self.text_cfg, dtype_of(self.vision_cfg.dtype),
                                     dtype_of(self.vision_cfg.param_dtype))
        self.visual_projection = nn.Dense(self.embed_dim, use_bias=False)
        self.text_projection = nn.Dense(self.embed_dim, use_bias=False)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(LOGIT_SCALE_INIT),
                                      ())
        if self.loss == "sigmoid":
            self.logit_bias = self.param("logit_bias",
                                         nn.initializers.constant(SIGMOID_BIAS_INIT), ())
        if self.regions:
            self.region_projection = nn.Dense(self.embed_dim, use_bias=False)
            self.region_logit_scale = self.param(
                "region_logit_scale", nn.initializers.constant(LOGIT_SCALE_INIT), ())

    def encode_image(self, pixel_values, vision_out=None):
        out = self.vision_tower(pixel_values) if vision_out is None else vision_out
        return _l2_normalize(self.visual_projection(out["pooler_output"]))

    def encode_text(self, input_ids, eos_index):
        h = self.text_model(self.text_model.embed(input_ids))
        pooled = jnp.take_along_axis(h, eos_index[:, None, None], axis=1)[:, 0]
        return _l2_normalize(self.text_projection(pooled))

    def encode_regions(self, pixel_values, region_weights, vision_out=None):
        """[b, regions, patches] weights (each row sums to 1, or 0 for no region) ->
        normalised region embeddings [b, regions, embed_dim]."""
        out = self.vision_tower(pixel_values) if vision_out is None else vision_out
        hidden = out["hidden_states"][self.region_layer]
        if self.vision_cfg.vision.use_class_token:
            hidden = hidden[:, 1:]
        return _l2_normalize(self.region_projection(
            jnp.einsum("brp,bpd->brd", region_weights.astype(hidden.dtype), hidden)))

    def __call__(self, pixel_values, input_ids, eos_index):
        """Image-to-text logits [b_images, b_texts]."""
        return self.logits(self.encode_image(pixel_values), self.encode_text(input_ids,
                                                                             eos_index))

    def logits(self, img, txt):
        scale = jnp.exp(jnp.minimum(self.logit_scale, LOGIT_SCALE_MAX))
        bias = self.logit_bias if self.loss == "sigmoid" else 0.0
        return scale * img @ txt.T + bias

    def init_all(self, pixel_values, input_ids, eos_index):
        """Touches every parameter (what `init` runs): the logits, and the region logits
        with regions."""
        out = self(pixel_values, input_ids, eos_index)
        if self.regions:
            g = self.vision_cfg.vision.image_size // self.vision_cfg.vision.patch_size
            w = jnp.ones((pixel_values.shape[0], 1, g * g)) / (g * g)
            k = jnp.zeros((pixel_values.shape[0],), jnp.int32)
            out = out.sum() + self.region_logits(pixel_values, w, input_ids, eos_index,
                                                 k).sum()
        return out

    def region_logits(self, pixel_values, region_weights, phrase_ids, phrase_eos,
                      phrase_index, vision_out=None):
        """Region-to-phrase logits [b * regions, b * regions]: region k of the flattened
        [b, regions] against the phrase of every region, phrase_ids[phrase_index[k]]. With
        no more distinct phrases than regions, each distinct phrase is encoded once."""
        reg = self.encode_regions(pixel_values, region_weights, vision_out)
        reg = reg.reshape(-1, reg.shape[-1])
        if phrase_ids.shape[0] <= phrase_index.shape[0]:
            txt = self.encode_text(phrase_ids, phrase_eos)[phrase_index]
        else:
            txt = self.encode_text(phrase_ids[phrase_index], phrase_eos[phrase_index])
        scale = jnp.exp(jnp.minimum(self.region_logit_scale, LOGIT_SCALE_MAX))
        return scale * reg @ txt.T

    def with_regions(self, pixel_values, input_ids, eos_index, region_weights, phrase_ids,
                     phrase_eos, phrase_index):
        """(image-to-text logits, region-to-phrase logits) from one pass of the vision
        tower."""
        out = self.vision_tower(pixel_values)
        img = self.encode_image(pixel_values, out)
        txt = self.encode_text(input_ids, eos_index)
        return self.logits(img, txt), self.region_logits(pixel_values, region_weights,
                                                        phrase_ids, phrase_eos, phrase_index,
                                                        out)


def _l2_normalize(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def contrastive_loss(logits):
    """Mean of the image->text and text->image cross-entropies; pair i matches pair i."""
    labels = jnp.arange(logits.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    return (i2t.mean() + t2i.mean()) / 2


LOSSES = {"softmax": contrastive_loss, "sigmoid": sigmoid_loss}  # ContrastiveModel.loss


def region_loss(logits, phrase, valid):
    """Contrastive loss between regions and phrases where several regions may share a
    phrase: each row (and column) puts its probability on any entry with its phrase id.
    logits [n, n]; phrase [n] ids; valid [n] bool (padding rows and columns are left out).
    Returns the mean over valid rows of the two directions."""
    neg = jnp.finfo(logits.dtype).min
    both = valid[:, None] & valid[None, :]
    same = both & (phrase[:, None] == phrase[None, :])

    def one_way(x):
        all_ = jax.nn.logsumexp(jnp.where(both, x, neg), axis=1)
        pos = jax.nn.logsumexp(jnp.where(same, x, neg), axis=1)
        return all_ - pos

    per = (one_way(logits) + one_way(logits.T)) / 2
    return jnp.sum(jnp.where(valid, per, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


# ---- data -----------------------------------------------------------------------------------
def load_pairs(pairs, what: str = "pairs", regions: bool = False) -> list:
    """(image, caption) pairs from a pairs_{split}.json path or a list of pairs; with
    `regions`, (image, caption, [(box, phrase), ...]) triples."""
    if isinstance(pairs, (str, os.PathLike)):
        from mllm_jax.demo.files import read_pairs
        if not os.path.exists(pairs):
            raise FileNotFoundError(f"{what}: no pairs file at {os.fspath(pairs)}; write one "
                                    f"with shapes.write_dataset")
        source, pairs = os.fspath(pairs), read_pairs(pairs, regions=regions)
    else:
        source, pairs = what, list(pairs)
    if not pairs:
        raise ValueError(f"{source}: no image-caption pairs; contrastive pre-training needs "
                         f"at least one")
    n = 3 if regions else 2
    for k, p in enumerate(pairs):
        if len(p) < n or not isinstance(p[1], str) or not p[1].strip():
            want = "(image, non-empty caption, regions)" if regions \
                else "(image, non-empty caption)"
            raise ValueError(f"{source}: pair {k} is not {want}: {p!r}")
    return [tuple(p[:n]) for p in pairs]


def region_arrays(pairs, image_size: int, patch_size: int, phrase_index: dict,
                  max_regions: int, sizes=None):
    """(weights [n, max_regions, patches] float32, phrase ids [n, max_regions] int32, -1 for
    none) of (image, caption, regions) triples. A region's weights are the fractions of its
    box's area on each patch of the image as preprocessed (shortest edge resized to
    `image_size`, centre crop), so they sum to 1. `sizes`: the images' (width, height), if
    known (else each image is read for it)."""
    g = image_size // patch_size
    weights = np.zeros((len(pairs), max_regions, g * g), np.float32)
    ids = np.full((len(pairs), max_regions), -1, np.int32)
    edges = np.arange(g + 1) * patch_size
    for k, (image, _, regions) in enumerate(pairs):
        if len(regions) > max_regions:
            raise ValueError(f"pair {k}: {len(regions)} regions, more than max_regions "
                             f"{max_regions}")
        w, h = sizes[k] if sizes is not None else _image_size(image)
        scale = image_size / min(w, h)
        off_x, off_y = (round(w * scale) - image_size) // 2, (round(h * scale) - image_size) // 2
        for r, (box, phrase) in enumerate(regions):
            x0, y0, x1, y1 = (np.asarray(box, np.float64) * scale
                              - [off_x, off_y, off_x, off_y]).clip(0, image_size)
            ox = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0, None)
            oy = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0, None)
            area = np.outer(oy, ox).reshape(-1)
            if area.sum() <= 0:
                raise ValueError(f"pair {k} ({image if isinstance(image, str) else 'array'}): "
                                 f"region {r} box {tuple(box)} ({phrase!r}) has no area "
                                 f"inside the {image_size}px image")
            weights[k, r] = area / area.sum()
            ids[k, r] = phrase_index[phrase]
    return weights, ids


def _phrase_length(phrases, tokenizer, max_length: int) -> int:
    """Tokens per phrase row: the longest phrase and its EOS, at most `max_length`."""
    return min(max_length, 1 + max(len(tokenizer.encode(p)) for p in phrases))


def _image_size(image) -> tuple:
    """(width, height) of a path, PIL image or [h, w, c] array."""
    if isinstance(image, np.ndarray):
        return image.shape[1], image.shape[0]
    if isinstance(image, (str, os.PathLike)):
        from mllm_jax.data.image import read_image
        image = read_image(image)
    return image.size


def load_pixels(images, image_size: int) -> np.ndarray:
    """Images (paths, PIL images or uint8 arrays) -> CLIP-normalised float32 [n, s, s, 3]."""
    return load_images(images, image_size)[0]


def load_images(images, image_size: int) -> tuple:
    """(pixels as `load_pixels` gives them, [(width, height)] of the images as read): each
    image is read once."""
    from PIL import Image

    from mllm_jax.data.image import read_image
    out, sizes = [], []
    for k, image in enumerate(images):
        try:
            if isinstance(image, np.ndarray):
                image = Image.fromarray(np.asarray(image, np.uint8))
            elif isinstance(image, (str, os.PathLike)):
                image = read_image(image)
            sizes.append(image.size)
            out.append(preprocess_image(image, image_size, CLIP_MEAN, CLIP_STD))
        except OSError as e:
            name = images[k] if isinstance(images[k], (str, os.PathLike)) else "array"
            raise ValueError(f"image {k} ({name}) cannot be read: {e}") from e
    return np.stack(out).astype(np.float32), sizes


def tokenize_captions(captions, tokenizer, max_length: int):
    """(ids [n, max_length] padded, eos_index [n]): each caption's tokens then EOS, cut to
    max_length (the EOS is kept)."""
    if tokenizer.eos_id is None:
        raise ValueError(f"tokenizer {tokenizer.source} has no EOS token; the text tower pools "
                         f"at EOS")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    ids = np.full((len(captions), max_length), pad, np.int32)
    eos = np.zeros(len(captions), np.int32)
    for k, caption in enumerate(captions):
        toks = tokenizer.encode(caption)[:max_length - 1] + [tokenizer.eos_id]
        ids[k, :len(toks)] = toks
        eos[k] = len(toks) - 1
    return ids, eos


def as_tokenizer(tokenizer):
    """``tokenizer``, or the tokenizer loaded from it when it is a path."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from mllm_jax.data.tokenizer import load_tokenizer
        return load_tokenizer(os.fspath(tokenizer))
    return tokenizer


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """[steps, batch_size] example indices: shuffled epochs without replacement, seeded."""
    rng = np.random.default_rng(seed)
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    order = np.concatenate([rng.permutation(n)[:per_epoch * batch_size] for _ in range(epochs)])
    return order[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


# ---- training -------------------------------------------------------------------------------
def init_params(model, seed: int, *args, overrides=None) -> dict:
    """Initial parameters drawn with numpy from the abstract tree: N(0, 0.02) for weights and
    embeddings, ones for norm scales, zeros for biases, `overrides` {leaf name: value}
    (compiling `model.init` costs more than a demo-sized training run can spare)."""
    scale = SIGMOID_SCALE_INIT if getattr(model, "loss", "") == "sigmoid" else LOGIT_SCALE_INIT
    overrides = {"logit_scale": scale, "logit_bias": SIGMOID_BIAS_INIT, **(overrides or {})}
    rng = np.random.default_rng(seed)
    init = functools.partial(model.init, method="init_all") if hasattr(model, "init_all") \
        else model.init
    shapes = nn.meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0), *args)["params"])
    flat = flax.traverse_util.flatten_dict(shapes)
    out = {}
    for path, leaf in sorted(flat.items()):
        if path[-1] in overrides:
            value = np.full(leaf.shape, overrides[path[-1]])
        elif path[-1] == "scale":
            value = np.ones(leaf.shape)
        elif path[-1] == "bias":
            value = np.zeros(leaf.shape)
        else:
            value = 0.02 * rng.standard_normal(leaf.shape)
        out[path] = jnp.asarray(np.asarray(value, leaf.dtype))
    return flax.traverse_util.unflatten_dict(out)


@dataclasses.dataclass
class ContrastiveResult:
    """`vision_params`: the VisionModel tree (`{"vision_model": ...}`), LLaVA's
    `vision_tower`; `vision_config`: its clip_vision model config; `params`: every
    parameter of the ContrastiveModel; `metrics`: `losses` (one per step), `val_accuracy`
    (in-batch image->text top-1, a hit when the retrieved caption's text is the image's),
    `val_chance` (the same for a random guess), `train_accuracy`, `logit_scale`, `seconds`."""
    vision_params: Any
    vision_config: ml_collections.ConfigDict
    text_config: ml_collections.ConfigDict
    params: Any
    metrics: dict


def pretrain_contrastive(train, tokenizer, *, val=None, vision_config=None, patch_size: int = 8,
                         text_hidden: int = 64, text_layers: int = 2, embed_dim: int = 64,
                         max_length: int = 24, steps: int = 500, batch_size: int = 64,
                         lr: float = 1e-3, weight_decay: float = 0.1,
                         warmup_ratio: float = 0.05, eval_batch: int = 64, seed: int = 0,
                         region_weight: float = 0.0, region_layer: int = -1,
                         loss: str = "softmax", progress: Callable | None = None,
                         log_every: int = 10
                         ) -> ContrastiveResult:
    """Trains the image and text towers on `train` pairs (a pairs_{split}.json path or a list
    of (image, caption)); `tokenizer` is a Tokenizer or its directory. `vision_config`
    (a clip_vision model config) defaults to `vision_model_config(image size, patch_size)`.
    Accuracy is measured on `val` pairs when given, in chunks of `eval_batch`. `progress`
    is called as progress(step, loss) every `log_every` steps and at the last one.
    `region_weight` > 0 adds the region-phrase loss with that weight; the pairs must then
    carry regions (files from `shapes.write_dataset`, or (image, caption, [(box, phrase)])
    triples) and `region_layer` picks the hidden states the regions pool. `loss`: "softmax"
    (CLIP) or "sigmoid" (SigLIP) for the image-text pairs.
    Deterministic for a seed."""
    if loss not in LOSSES:
        raise ValueError(f"unknown contrastive loss {loss!r}; known: {', '.join(LOSSES)}")
    if steps < 1 or batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got {steps} and {batch_size}")
    if region_weight < 0:
        raise ValueError(f"region_weight must be >= 0, got {region_weight}")
    regions = region_weight > 0
    tok = as_tokenizer(tokenizer)
    train_pairs = load_pairs(train, "train pairs", regions)
    val_pairs = load_pairs(val, "val pairs", regions) if val is not None else None
    if val_pairs is not None and len(val_pairs) < 2:
        raise ValueError(f"val pairs: retrieval accuracy needs at least 2 pairs, got "
                         f"{len(val_pairs)}")
    if vision_config is None:
        size = _native_size(train_pairs[0][0])
        vision_config = vision_model_config(size, patch_size)
    v = vision_config.vision
    if v.image_size % v.patch_size:
        raise ValueError(f"vision image_size {v.image_size} is not divisible by patch_size "
                         f"{v.patch_size}")
    text_cfg = text_tower_config(tok.vocab_size, text_hidden, text_layers, max_length=max_length,
                                 tokenizer=tok)
    start = time.perf_counter()

    pixels, sizes = load_images([p[0] for p in train_pairs], v.image_size)
    pixels = jnp.asarray(pixels)
    ids, eos = tokenize_captions([p[1] for p in train_pairs], tok, max_length)
    ids, eos = jnp.asarray(ids), jnp.asarray(eos)
    batch_size = min(batch_size, len(train_pairs))
    order = batch_order(len(train_pairs), batch_size, steps, seed)

    region_data = None
    if regions:
        phrases = sorted({ph for p in train_pairs for _, ph in p[2]})
        if not phrases:
            raise ValueError("train pairs: region_weight > 0 but no pair has a region")
        max_regions = max(len(p[2]) for p in train_pairs)
        w, pid = region_arrays(train_pairs, v.image_size, v.patch_size,
                               {ph: k for k, ph in enumerate(phrases)}, max_regions, sizes)
        p_ids, p_eos = tokenize_captions(phrases, tok, _phrase_length(phrases, tok, max_length))
        region_data = tuple(map(jnp.asarray, (w, pid, p_ids, p_eos)))

    model = ContrastiveModel(vision_config, text_cfg, embed_dim, regions, region_layer, loss)
    params = init_params(model, seed, pixels[:1], ids[:1], eos[:1])
    opt = dict(lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, grad_clip=1.0,
               b2=0.98, eps=1e-6)
    key = (vision_config.to_json(), text_cfg.to_json(), embed_dim, tuple(sorted(opt.items())),
           steps, float(region_weight), region_layer, loss)
    if key not in _COMPILED:
        _COMPILED.clear()  # keeps one configuration's programs
        _COMPILED[key] = _programs(model, params, opt, steps, region_weight)
    tx, train_step, enc, _ = _COMPILED[key]
    opt_state = jax.jit(tx.init)(params)  # one program, not one per leaf shape

    losses = []
    for step in range(steps):
        params, opt_state, loss = train_step(params, opt_state, pixels, ids, eos,
                                             order[step], region_data)
        losses.append(loss)
        if progress is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            progress(step + 1, float(loss))
    losses = [float(x) for x in jax.device_get(losses)]
    metrics = {"losses": losses, "logit_scale": float(jnp.exp(params["logit_scale"])),
               "steps": steps, "batch_size": batch_size}
    enc = [functools.partial(f, params) for f in enc]
    train_n = min(len(train_pairs), 512)
    acc, chance = retrieval_accuracy(enc, pixels[:train_n], [p[1] for p in train_pairs[:train_n]],
                                     tok, max_length, eval_batch)
    metrics.update(train_accuracy=acc, train_chance=chance)
    if val_pairs is not None:
        val_pixels, val_sizes = load_images([p[0] for p in val_pairs], v.image_size)
        acc, chance = retrieval_accuracy(enc, val_pixels, [p[1] for p in val_pairs], tok,
                                         max_length, eval_batch)
        metrics.update(val_accuracy=acc, val_chance=chance)
    if regions:
        reg = functools.partial(_COMPILED[key][3], params)
        metrics["train_region_accuracy"] = region_accuracy(
            enc[1], reg, pixels[:train_n], train_pairs[:train_n], tok, max_length, v,
            eval_batch, sizes[:train_n])
        if val_pairs is not None:
            metrics["val_region_accuracy"] = region_accuracy(
                enc[1], reg, val_pixels, val_pairs, tok, max_length, v, eval_batch, val_sizes)
    metrics["seconds"] = time.perf_counter() - start
    return ContrastiveResult(params["vision_tower"], vision_config, text_cfg, params, metrics)


def _native_size(image) -> int:
    """The side of a square image (path, PIL image or array)."""
    w, h = _image_size(image)
    if h != w:
        raise ValueError(f"image {image if isinstance(image, str) else ''} is {h}x{w}; give a "
                         f"vision_config whose image_size to resize to")
    return h


_COMPILED = {}  # configuration -> (optimizer, train step, encoders), reused by later calls


def _programs(model, params, opt: dict, steps: int, region_weight: float = 0.0):
    """The optimizer, the jitted train step, the encoders (image, text) and the region
    encoder (None without regions) of a configuration."""
    tx, _ = make_optimizer(optimizer_settings(**opt), params, steps)
    pair_loss = LOSSES[model.loss]

    # The data are arguments, not constants: XLA would otherwise fold them into the program.
    @jax.jit
    def train_step(params, opt_state, pixels, ids, eos, idx, region_data=None):
        def loss_fn(p):
            x = pixels[idx]
            if region_data is None:
                return pair_loss(model.apply({"params": p}, x, ids[idx], eos[idx]))
            w, pid, p_ids, p_eos = region_data
            phrase = pid[idx].reshape(-1)
            k = jnp.maximum(phrase, 0)
            logits, reg_logits = model.apply({"params": p}, x, ids[idx], eos[idx], w[idx],
                                             p_ids, p_eos, k, method="with_regions")
            return pair_loss(logits) + region_weight * region_loss(
                reg_logits, phrase, phrase >= 0)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params["logit_scale"] = jnp.minimum(params["logit_scale"], LOGIT_SCALE_MAX)
        if "region_logit_scale" in params:
            params["region_logit_scale"] = jnp.minimum(params["region_logit_scale"],
                                                       LOGIT_SCALE_MAX)
        return params, opt_state, loss

    img = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"))
    txt = jax.jit(lambda p, i, e: model.apply({"params": p}, i, e, method="encode_text"))
    reg = jax.jit(lambda p, x, w: model.apply({"params": p}, x, w, method="encode_regions")) \
        if model.regions else None
    return tx, train_step, (img, txt), reg


def encode_chunked(fn, arrays, chunk: int) -> np.ndarray:
    """fn(*arrays) computed `chunk` rows at a time and concatenated; a short chunk is padded
    to full size (and the padding dropped), so one compiled program serves every chunk of
    every call."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    out = []
    for s in range(0, n, chunk):
        part = [a[s:s + chunk] for a in arrays]
        short = chunk - len(part[0])
        if short:
            part = [np.concatenate([p, np.repeat(p[:1], short, axis=0)]) for p in part]
        out.append(np.asarray(fn(*map(jnp.asarray, part)))[:chunk - short])
    return np.concatenate(out)


def region_accuracy(encode_text, encode_regions, pixels, pairs, tokenizer, max_length: int,
                    vision, chunk: int = 64, sizes=None) -> float:
    """Top-1 accuracy of naming each region of (image, caption, regions) `pairs` by the
    nearest of the pairs' distinct phrases. `vision`: the vision section of the config;
    `sizes`: the images' (width, height), if known."""
    phrases = sorted({ph for p in pairs for _, ph in p[2]})
    if not phrases:
        return float("nan")
    index = {ph: k for k, ph in enumerate(phrases)}
    w, pid = region_arrays(pairs, vision.image_size, vision.patch_size, index,
                           max(len(p[2]) for p in pairs), sizes)
    ids, eos = tokenize_captions(phrases, tokenizer,
                                 _phrase_length(phrases, tokenizer, max_length))
    txt = encode_chunked(encode_text, (ids, eos), chunk)
    reg = encode_chunked(encode_regions, (pixels, w), chunk)
    valid = pid >= 0
    best = np.argmax(reg[valid] @ txt.T, axis=1)
    return float(np.mean(best == pid[valid]))


def retrieval_accuracy(encoders, pixels, captions, tokenizer, max_length: int, chunk: int = 64):
    """(accuracy, chance) of in-batch image->text top-1 retrieval over consecutive chunks of
    `chunk` pairs; a retrieved caption counts when its text equals the image's own (the
    world repeats captions), and chance is the expected accuracy of a uniform guess.
    `encoders`: (encode_image, encode_text) functions of a trained ContrastiveModel."""
    n = len(captions)
    if n < 2:
        raise ValueError(f"retrieval accuracy needs at least 2 pairs, got {n}")
    enc_img, enc_txt = encoders
    ids, eos = tokenize_captions(captions, tokenizer, max_length)
    img = encode_chunked(enc_img, (pixels,), chunk)
    txt = encode_chunked(enc_txt, (ids, eos), chunk)
    hits, chance = [], []
    for s in range(0, n, chunk):
        caps = captions[s:s + chunk]
        if len(caps) < 2:
            continue
        best = np.argmax(img[s:s + chunk] @ txt[s:s + chunk].T, axis=1)
        for i, j in enumerate(best):
            hits.append(caps[j] == caps[i])
            chance.append(sum(c == caps[i] for c in caps) / len(caps))
    return float(np.mean(hits)), float(np.mean(chance))
