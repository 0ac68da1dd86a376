"""Model FLOPs per training step (matmuls only, 2 FLOPs per multiply-add).

Each part counts its forward pass once, its activation gradients once more when anything
upstream of it is trained, and its weight gradients once more when it is trained itself:
a frozen vision tower is counted forward-only; a frozen LLM under a trained projector
forward plus activation gradients.
"""


def vision_forward(v, layers_run: int) -> float:
    grid = (v.image_size // v.patch_size) ** 2
    t = grid + (1 if v.use_class_token else 0)
    d, f = v.hidden_size, v.intermediate_size
    patch = 2 * grid * v.patch_size ** 2 * v.num_channels * d
    per_layer = 2 * t * 4 * d * d + 2 * t * 2 * d * f + 2 * 2 * t * t * d
    return patch + layers_run * per_layer


def projector_forward(c, tokens: int) -> float:
    d_in = c.vision.hidden_size * (1 if isinstance(c.vision_feature_layer, int)
                                   else len(c.vision_feature_layer))
    d = c.text.hidden_size
    n = 2 * tokens * d_in * d
    if c.projector.type == "mlp2x_gelu":
        n += 2 * tokens * d * d
    return n


def text_forward(t, seq: int) -> float:
    d, hd = t.hidden_size, t.head_dim
    q = t.num_attention_heads * hd
    kv = t.num_key_value_heads * hd
    per_layer = (2 * seq * d * (2 * q + 2 * kv) + 2 * seq * 3 * d * t.intermediate_size
                 + 2 * 2 * seq * seq * q)
    return t.num_hidden_layers * per_layer + 2 * seq * d * t.vocab_size


def vision_layers_run(c) -> int:
    layers = [c.vision_feature_layer] if isinstance(c.vision_feature_layer, int) else list(
        c.vision_feature_layer)
    n = c.vision.num_hidden_layers
    return max(l % (n + 1) for l in layers)


def train_step_flops(cfg, batch: int, seq: int, images_per_sample: int,
                     trained: dict) -> float:
    """trained: {'vision': bool, 'projector': bool, 'llm': bool}."""
    total = 0.0
    upstream = False
    if cfg.model_type == "llava" and images_per_sample:
        n_img = batch * images_per_sample
        vis = vision_forward(cfg.vision, vision_layers_run(cfg)) * n_img
        total += vis * (3 if trained["vision"] else 1)
        upstream = trained["vision"]
        tokens = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
        proj = projector_forward(cfg, tokens) * n_img
        total += proj * (1 + int(upstream) + int(trained["projector"]))
        upstream = upstream or trained["projector"]
    txt = text_forward(cfg.text, seq) * batch
    total += txt * (1 + int(upstream) + int(trained["llm"]))
    return total
