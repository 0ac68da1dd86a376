"""SigLIP's sigmoid contrastive loss (Zhai et al., "Sigmoid Loss for Language Image
Pre-Training"), the pre-training objective beside CLIP's softmax one
(`contrastive.ContrastiveModel(loss="sigmoid")`, `pretrain_contrastive(loss="sigmoid")`).

Every image-text pair of the batch is its own binary classification: logits
z_ij = exp(logit_scale) * x_i . y_j + logit_bias (x, y L2-normalised), label +1 on the
diagonal and -1 elsewhere, and

    loss = -1/n * sum_i sum_j log_sigmoid(label_ij * z_ij),

summed over the row and averaged over the rows, as big_vision's siglip trainer
(`-jnp.mean(jnp.sum(loglik, axis=-1))`) and HF's `SiglipModel(return_loss=True)` compute it.
The labels are symmetric, so image rows and text rows give the same number. The logits are
a function of the whole batch: under a mesh whose `data` axis splits the batch, `jit`
gathers what each product needs, and the loss equals the one-device loss.

The paper initialises logit_scale at log(10) and logit_bias at -10, so that the many
negatives start near their target and the first steps are not spent on them.
"""
import math

import jax
import jax.numpy as jnp

SIGMOID_SCALE_INIT = math.log(10.0)
SIGMOID_BIAS_INIT = -10.0


def sigmoid_logits(image_embeds, text_embeds, logit_scale, logit_bias):
    """[n_images, n_texts] logits of normalised embeddings."""
    return jnp.exp(logit_scale) * image_embeds @ text_embeds.T + logit_bias


def sigmoid_loss(logits):
    """The sigmoid loss of square [n, n] logits whose pair i matches pair i (see the module
    docstring); computed in float32."""
    n = logits.shape[0]
    if logits.ndim != 2 or logits.shape[1] != n:
        raise ValueError(f"sigmoid_loss takes square [n, n] logits, got {logits.shape}")
    labels = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
    loglik = jax.nn.log_sigmoid(labels * logits.astype(jnp.float32))
    return -jnp.mean(jnp.sum(loglik, axis=-1))
