"""Parameter paths <-> HF tensor names, with the fixed per-leaf transforms.

Our paths are HF's names with Flax leaf names: `a/b/layers_3/q_proj/kernel` is
`a.b.layers.3.q_proj.weight` transposed. Scanned stacks (`layers/...` with a leading layer
axis) are handled by unstacking to the `layers_{i}` view first.
"""
import re

# Checkpoint key spellings other than the canonical (published-checkpoint) one, per model.
# Applied in order to every key found on disk.
KEY_ALIASES = {
    "llava": [
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^model\.vision_tower\.", "vision_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
    ],
    "clip_vision": [(r"^(?!vision_model\.)(?!text_model\.)(?=(embeddings|encoder|pre_layrnorm|"
                     r"post_layernorm)\.)", "vision_model.")],
    "causal_lm": [],
}
# Buffers some checkpoints carry that are not parameters; always skipped.
IGNORED_KEYS = [r"(^|\.)position_ids$", r"rotary_emb\.inv_freq$"]
# Parts of a full CLIP (text + vision) checkpoint that a vision-only model does not use.
CLIP_TEXT_KEYS = [r"^text_model\.", r"^text_projection\.", r"^visual_projection\.",
                  r"^logit_scale$"]

LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


def canonical_key(key: str, model_type: str) -> str:
    for pattern, repl in KEY_ALIASES[model_type]:
        key = re.sub(pattern, repl, key)
    return key


def hf_name(path: tuple[str, ...]) -> str:
    """('language_model','model','layers_3','mlp','up_proj','kernel') ->
    'language_model.model.layers.3.mlp.up_proj.weight'."""
    parts = [re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in path[:-1]]
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
