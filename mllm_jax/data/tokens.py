"""Token-id helpers shared by the processor-free paths (demo, data pipelines)."""


def expand_image_tokens(ids, image_token_index: int, tokens_per_image: int):
    """Replaces each image placeholder id with `tokens_per_image` copies, as HF's LLaVA
    processor does, so `input_ids` hold one image token per image feature."""
    out = []
    for i in ids:
        out.extend([i] * tokens_per_image if i == image_token_index else [i])
    return out
