"""BLIP-2's stage-1 objective (`stage.objective = "blip2_stage1"`): ITC + ITM + ITG of a
Q-Former model (`model_type` blip2_qformer) on image-caption pairs.

The batch (data mode "image_text"): pixel_values [B, H, W, C] (or [B, 1, H, W, C]),
input_ids [B, T] (the caption in the Q-Former's tokenizer: [CLS] caption [SEP], padded),
attention_mask [B, T], image_ids [B] int32 (pairs with the same id are matches of each
other, never negatives).

One step, on the whole (global) batch the step sees:
  1. the tower's features of every image (no gradient when the tower is frozen);
  2. ITC: the queries' and the captions' normalised projections, similarities against every
     pair of the batch; under `jit` over a mesh the batch is the global one, so the
     negatives are gathered across the data-parallel axes, as LAVIS's all_gather does;
  3. ITM: one hard negative image per caption and one hard negative caption per image,
     sampled from the ITC similarities with an RNG derived from the train state's RNG and
     step (`jax.random.fold_in`), so a resumed run draws the same negatives;
  4. ITG: the captions decoded from the queries with the decoder token first.
The Q-Former's dropout (its config's probabilities) is on with `dropout=True`, drawing
from the same per-step RNG (as an "rbg" key, `dropout_key`).

Weights `itc_weight`, `itm_weight`, `itg_weight` (1 each in BLIP-2) scale the three losses;
`label_smoothing` (0.1) applies to ITC and ITG, as in LAVIS. Metrics: loss_itc, loss_itm,
loss_itg, itm_accuracy, temp.

With `train.micro_batches` > 1 the negatives of a micro-batch are the pairs of that
micro-batch (over the whole mesh).
"""
import jax
import jax.numpy as jnp

from mllm_jax.models import blip2_qformer  # noqa: F401  (registers the model family)
from mllm_jax.train import blip2_losses as L
from mllm_jax.train.objectives import Objective, register_objective

BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "image_ids")


class Blip2Stage1(Objective):
    data_mode = "image_text"
    uses_rng = True

    def __init__(self, itc_weight: float = 1.0, itm_weight: float = 1.0,
                 itg_weight: float = 1.0, label_smoothing: float = 0.1, dropout: bool = True,
                 chunk_size: int = 2048):
        super().__init__(chunk_size)
        self.weights = {"itc": float(itc_weight), "itm": float(itm_weight),
                        "itg": float(itg_weight)}
        for name, w in self.weights.items():
            if not w >= 0:
                raise ValueError(f"stage.objective_kwargs.{name}_weight must be >= 0, got {w}")
        if not any(self.weights.values()):
            raise ValueError("stage.objective_kwargs: every loss weight is 0; give at least "
                             "one of itc_weight, itm_weight, itg_weight a positive value")
        self.label_smoothing = float(label_smoothing)
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"stage.objective_kwargs.label_smoothing must be in [0, 1), got "
                             f"{label_smoothing}")
        self.dropout = bool(dropout)

    def check(self, trainable_paths):
        if not any(p == "query_tokens" or p.startswith("qformer/") for p in trainable_paths):
            raise ValueError("blip2_stage1 trains the Q-Former: stage.trainable must match "
                             "query_tokens and qformer/ (a blip2_qformer model)")

    def project(self, params):
        """After every update: the temperature back into [0.001, 0.5] (LAVIS clamps it in
        place before each forward)."""
        if isinstance(params, dict) and "temp" in params:
            params = {**params, "temp": jnp.clip(params["temp"], L.TEMP_MIN, L.TEMP_MAX)}
        return params

    def loss(self, model, params, batch, frozen_extra, rng=None):
        del frozen_extra
        return stage1_loss(model, params, batch, rng, weights=self.weights,
                           label_smoothing=self.label_smoothing,
                           dropout=self.dropout and rng is not None)


def stage1_loss(model, params, batch, rng, *, weights=None, label_smoothing=0.1,
                dropout=False):
    """(sum over the batch of the weighted per-pair loss, batch size, metric sums)."""
    weights = weights or {"itc": 1.0, "itm": 1.0, "itg": 1.0}
    missing = [k for k in BATCH_KEYS[:3] if k not in batch]
    if missing:
        raise ValueError(f"blip2_stage1 needs batch keys {list(BATCH_KEYS)}; missing "
                         f"{missing} (data mode image_text)")
    pix, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    if pix.ndim == 5:
        if pix.shape[1] != 1:
            raise ValueError(f"blip2_stage1 reads one image per caption; pixel_values has "
                             f"{pix.shape[1]} per sample (set data.images=1)")
        pix = pix[:, 0]
    image_ids = batch.get("image_ids")
    if rng is None:
        rng = jax.random.PRNGKey(0)
    k_neg, k_itc, k_itm, k_itg = jax.random.split(rng, 4)
    det = not dropout

    def run(method, *args, key):
        kw = {} if det else {"rngs": {"dropout": dropout_key(key)}}
        return model.apply({"params": params}, *args, deterministic=det, method=method, **kw)

    emb = model.apply({"params": params}, pix, method="image_embeds")
    b = ids.shape[0]
    img, txt = run("itc_features", emb, ids, mask, key=k_itc)
    temp = params["temp"]
    loss_itc, sim = L.itc_loss(img, txt, temp, image_ids, label_smoothing)

    neg_img, neg_txt, ok_img, ok_txt = L.hard_negatives(k_neg, sim, image_ids)
    ids_all = jnp.concatenate([ids, ids, ids[neg_txt]])
    mask_all = jnp.concatenate([mask, mask, mask[neg_txt]])
    emb_all = jnp.concatenate([emb, emb[neg_img], emb])
    itm = run("itm_logits", emb_all, ids_all, mask_all, key=k_itm)
    valid = jnp.concatenate([jnp.ones(b, bool), ok_img, ok_txt])
    loss_itm, itm_acc = L.itm_loss(itm, valid)

    logits = run("itg_logits", emb, ids, mask, key=k_itg)
    loss_itg, _ = L.itg_loss(logits, ids, mask, label_smoothing)

    total = (weights["itc"] * loss_itc + weights["itm"] * loss_itm
             + weights["itg"] * loss_itg)
    n = jnp.asarray(b, jnp.float32)
    metrics = {"loss_itc": loss_itc * n, "loss_itm": loss_itm * n, "loss_itg": loss_itg * n,
               "itm_accuracy": itm_acc * n,
               "temp": jnp.clip(temp, L.TEMP_MIN, L.TEMP_MAX) * n}
    return total * n, jnp.asarray(b, jnp.int32), metrics


def dropout_key(key):
    """A dropout key drawing its masks with XLA's RngBitGenerator (jax's "rbg"
    implementation) from `key`'s bits. Every dropout mask of a threefry key compiles to its
    own unrolled hash rounds: the stage-1 step (the Q-Former run three times) took four times
    as long to compile as without dropout; with this key it costs about what dropout-free
    compilation does. The masks stay a pure function of `key` (so of the train state's RNG
    and step: a resumed run draws the same ones on the same mesh)."""
    return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")


register_objective("blip2_stage1", Blip2Stage1)
