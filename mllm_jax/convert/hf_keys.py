"""Parameter paths <-> HF tensor names, with the fixed per-leaf transforms.

Our paths are HF's names with Flax leaf names: `a/b/layers_3/q_proj/kernel` is
`a.b.layers.3.q_proj.weight` transposed (BERT-style `encoder/layer_3` is `encoder.layer.3`,
T5's `encoder/block_3` is `encoder.block.3`, Qwen2-VL's `visual/blocks_3` is
`visual.blocks.3`).
Scanned stacks (`layers/...` with a leading layer axis) are handled by unstacking to the
`layers_{i}` view first.
"""
import re

from mllm_jax.models import registry

# Buffers some checkpoints carry that are not parameters; always skipped.
IGNORED_KEYS = [r"(^|\.)position_ids$", r"rotary_emb\.inv_freq$"]
LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


def canonical_key(key: str, model_type: str) -> str:
    """The published-checkpoint spelling of a key, by the family's `key_aliases`."""
    for pattern, repl in registry.MODELS.get(model_type).key_aliases:
        key = re.sub(pattern, repl, key)
    return key


def hf_name(path: tuple[str, ...]) -> str:
    """('language_model','model','layers_3','mlp','up_proj','kernel') ->
    'language_model.model.layers.3.mlp.up_proj.weight'."""
    parts = [re.sub(r"^(layers?|blocks?)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
    parts.append(LEAF_TO_HF.get(path[-1], path[-1]))
    return ".".join(parts)


def to_hf_layout(path: tuple[str, ...], array):
    """Our array -> the tensor HF stores (torch Linear [out, in], conv [O, I, kh, kw])."""
    if path[-1] == "kernel":
        if array.ndim == 2:
            return array.T
        if array.ndim == 4:
            return array.transpose(3, 2, 0, 1)
    return array


def from_hf_layout(path: tuple[str, ...], array):
    if path[-1] == "kernel":
        if array.ndim == 2:
            return array.T
        if array.ndim == 4:
            return array.transpose(2, 3, 1, 0)
    return array


def hf_shape(path, shape):
    shape = tuple(shape)
    if path[-1] == "kernel" and len(shape) == 2:
        return shape[::-1]
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def unstack_path(path: tuple[str, ...], layer: int) -> tuple[str, ...]:
    """The `layers_{layer}` path of a leaf under a scanned `layers` subtree."""
    i = path.index("layers")
    return path[:i] + (f"layers_{layer}",) + path[i + 1:]


def is_scanned(path: tuple[str, ...]) -> bool:
    return "layers" in path
