"""Model FLOPs per training step (matmuls only, 2 FLOPs per multiply-add).

Each family counts its own (`ModelFamily.train_flops`): for LLaVA, each part counts its
forward pass once, its activation gradients once more when anything upstream of it is
trained, and its weight gradients once more when it is trained itself: a frozen vision
tower is counted forward-only; a frozen LLM under a trained projector forward plus
activation gradients. Image tokens come from `models.tokens_per_image`, like everywhere.
"""
from mllm_jax.models import registry


def train_step_flops(cfg, batch: int, seq: int, images_per_sample: int, trainable) -> float:
    """cfg: the model config; trainable: the trainable parameter tree (or its top-level
    names); images_per_sample: 0 for text-only batches."""
    family = registry.family(cfg)
    if family.train_flops is None:
        raise registry.UnsupportedModelError(
            f"model_type {cfg.model_type!r} registers no FLOP count (ModelFamily.train_flops)")
    images = images_per_sample if registry.is_multimodal(cfg) else 0
    return float(family.train_flops(cfg, batch, seq, images, trainable))
