"""Model configs: small ConfigDicts whose fields mirror the HF config fields they come from."""
import ml_collections


def vision_config(**overrides) -> ml_collections.ConfigDict:
    """A ViT encoder. Defaults are OpenAI CLIP ViT-L/14 at 224 px."""
    c = ml_collections.ConfigDict()
    c.type = "clip"  # the encoder (models.registry.ENCODERS)
    c.hidden_size = 1024
    c.intermediate_size = 4096
    c.num_hidden_layers = 24
    c.num_attention_heads = 16
    c.num_channels = 3
    c.image_size = 224
    c.patch_size = 14
    c.hidden_act = "quick_gelu"
    c.layer_norm_eps = 1e-5
    c.use_class_token = True
    c.qkv_bias = True
    c.patch_bias = False  # OpenAI CLIP's patch conv has no bias
    c.pre_layernorm = True  # HF spells the key `pre_layrnorm`
    c.post_layernorm = True
    # BLIP-2's EVA ViT (`vision.type = "eva"`) as settings of the same tower:
    c.fused_qkv = False  # one `qkv` projection [d, 3d] instead of q_proj / k_proj / v_proj
    c.attn_out_name = "out_proj"  # BLIP: "projection"
    # class / position embeddings as plain [1, 1, d] / [1, n+1, d] parameters (BLIP) instead
    # of a [d] vector and an Embedding
    c.embeddings_as_parameters = False
    # post LayerNorm on every token of the last hidden state (BLIP), not only on the pooled one
    c.post_layernorm_tokens = False
    c.update(overrides)
    return c


def text_config(**overrides) -> ml_collections.ConfigDict:
    """A decoder-only LLM (LLaMA / Mistral / Qwen2). Defaults are LLaMA-2-7B."""
    c = ml_collections.ConfigDict()
    c.model_type = "llama"  # the decoder (models.registry.DECODERS): llama | mistral | qwen2
    c.vocab_size = 32000
    c.hidden_size = 4096
    c.intermediate_size = 11008
    c.num_hidden_layers = 32
    c.num_attention_heads = 32
    c.num_key_value_heads = 32
    c.head_dim = 128
    c.hidden_act = "silu"
    c.rms_norm_eps = 1e-5
    c.rope_theta = 10000.0
    # None, or a dict as in HF's `rope_scaling` (rope_type linear | llama3; dynamic is not
    # supported).
    c.rope_scaling = ml_collections.FieldReference(None, field_type=dict)
    c.max_position_embeddings = 4096
    c.qkv_bias = False  # Qwen2: True
    c.o_bias = False
    c.mlp_bias = False
    c.tie_word_embeddings = False
    c.sliding_window = ml_collections.FieldReference(None, field_type=int)
    c.bos_token_id = 1
    c.eos_token_id = 2
    c.pad_token_id = ml_collections.FieldReference(None, field_type=int)
    c.update(overrides)
    return c


def projector_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.type = "mlp2x_gelu"  # the connector (models.registry.CONNECTORS): linear | mlp2x_gelu
    c.bias = True
    c.hidden_act = "gelu"  # exact GELU, as torch's nn.GELU()
    c.update(overrides)
    return c


def runtime_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fields that change how the model runs, not what it computes."""
    c.dtype = "float32"  # activation / compute dtype
    c.param_dtype = "float32"
    c.scan_layers = False
    c.remat_policy = "none"  # none | full | dots | dots_no_batch, each also as "<name>+weights"
    # The LLM's causal self-attention over whole sequences (training, prefill): "xla", or
    # Pallas splash attention ("splash": TPU only; "auto": splash on TPU, XLA elsewhere;
    # "splash_interpret": the kernel in the Pallas interpreter, for tests). See models.splash.
    c.attention = "xla"
    return c


def llm_config(text=None, **overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model_type = "causal_lm"
    c.text = text if text is not None else text_config()
    runtime_fields(c)
    c.update(overrides)
    return c


def clip_vision_model_config(vision=None, **overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model_type = "clip_vision"
    c.vision = vision if vision is not None else vision_config()
    runtime_fields(c)
    c.update(overrides)
    return c


def llava_config(vision=None, text=None, projector=None, **overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model_type = "llava"
    c.vision = vision if vision is not None else vision_config()
    c.text = text if text is not None else text_config()
    c.projector = projector if projector is not None else projector_config()
    c.image_token_index = 32000
    # An int (HF: -2 = the second-to-last layer's output) or a list of ints, concatenated.
    c.vision_feature_layer = ml_collections.FieldReference(-2, field_type=object)
    c.vision_feature_select_strategy = "default"  # default: drop CLS | full: keep it
    c.image_seq_length = 576
    runtime_fields(c)
    c.update(overrides)
    return c


# Sections whose type field selects a registered part, whose config factory is then the
# template for that section.
_PARTS = (("vision", "type", "ENCODERS"), ("projector", "type", "CONNECTORS"),
          ("text", "model_type", "DECODERS"))


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """The inverse of `cfg.to_json()` for model configs: a dict-valued field such as
    `rope_scaling` comes back as a dict (not a ConfigDict), None stays None, lists stay lists.

    The registered family's config factory (and each part's) is the template, so typed
    fields (FieldReferences such as `rope_scaling`, `sliding_window`, `vision_feature_layer`)
    keep their declared types instead of becoming what JSON parses to, and fields added to a
    family since the JSON was written take their defaults."""
    import json

    from mllm_jax.models import registry

    data = json.loads(text)
    cfg = registry.MODELS.get(data.get("model_type")).config()
    for section, field, table in _PARTS:
        part = data.get(section)
        if isinstance(part, dict) and section in cfg:
            kind = part.get(field, cfg[section].get(field))
            cfg[section] = getattr(registry, table).get(kind).config()
    _merge(cfg, data)
    return cfg


def _merge(cfg: ml_collections.ConfigDict, data: dict):
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), ml_collections.ConfigDict):
            _merge(cfg[key], value)
        else:
            cfg[key] = value
