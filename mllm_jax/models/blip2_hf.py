"""BLIP-2 / InstructBLIP <-> HF: `Blip2Config` / `InstructBlipConfig` (config.json of
`Blip2ForConditionalGeneration` / `InstructBlipForConditionalGeneration`), the family
checks, and the checkpoint key spellings.

Tensor names follow from the parameter paths (`vision_model.*`, `query_tokens`, `qformer.*`,
`language_projection.*`, `language_model.*`), which are what transformers 5 writes and what
the published checkpoints hold.
"""
from mllm_jax import config as mc
from mllm_jax.models import checks
from mllm_jax.models.blip2 import QFORMER_TYPES, blip2_config, is_encoder_decoder
from mllm_jax.models.connectors.qformer_hf import check_qformer, qformer_from_hf, qformer_to_hf
from mllm_jax.models.registry import (DECODERS, ENCODERS, MODELS, InvalidConfigError,
                                      UnsupportedModelError)

# Our model_type -> HF's config.json model_type, architecture and vision model_type.
HF_MODEL_TYPES = {"blip2": "blip-2", "instructblip": "instructblip"}
ARCHITECTURES = {"blip2": "Blip2ForConditionalGeneration",
                 "instructblip": "InstructBlipForConditionalGeneration"}
VISION_MODEL_TYPES = {"blip2": "blip_2_vision_model", "instructblip": "instructblip_vision_model"}
# HF's default LLM when config.json has no text_config (both classes: OPT).
DEFAULT_TEXT_MODEL_TYPE = "opt"
LEGACY = ("this checkpoint predates transformers' BLIP-2 image tokens: its config.json has no "
          "image_token_index, and older transformers prepended the query outputs to the "
          "prompt instead. Set image_token_index in config.json to the id of the tokenizer's "
          "image token (add an '<image>' token to the tokenizer if it has none, as the "
          "updated published checkpoints do); the processor then puts num_query_tokens of "
          "them before the text")


def _section(hf: dict, name: str, where: str) -> dict:
    value = hf.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidConfigError(f"{where}: {name} must be a JSON object, not {value!r}")
    return value


def from_hf(hf: dict, where: str = "config.json", model_type: str = "blip2"):
    """Our config for HF's config.json dict of a BLIP-2 (`model_type` blip2) or an
    InstructBLIP (instructblip) checkpoint; every part checked before anything is built."""
    vision_hf = _section(hf, "vision_config", where)
    text_hf = _section(hf, "text_config", where)
    qformer_hf = dict(_section(hf, "qformer_config", where))
    vision = ENCODERS.get("eva").from_hf(vision_hf, f"{where} vision_config")
    text_type = text_hf.get("model_type", DEFAULT_TEXT_MODEL_TYPE)
    if text_type not in DECODERS:
        raise UnsupportedModelError(
            f"{where}: text_config model_type {text_type!r} is not supported (supported: "
            f"{', '.join(DECODERS.names())})")
    text = DECODERS.get(text_type).from_hf(text_hf, f"{where} text_config")
    # HF picks the Q-Former class by the composed model, whatever the section says.
    qformer_hf["model_type"] = QFORMER_TYPES[model_type]
    num_query_tokens = hf.get("num_query_tokens", 32)
    checks.positive_int({"num_query_tokens": num_query_tokens}, "num_query_tokens", where)
    projector = qformer_from_hf(qformer_hf, num_query_tokens=num_query_tokens,
                                encoder_hidden_size=vision.hidden_size,
                                where=f"{where} qformer_config")
    image_token = hf.get("image_token_index", hf.get("image_token_id"))
    if image_token is None:
        raise UnsupportedModelError(f"{where}: {LEGACY}")
    checks.token_id({"image_token_index": image_token}, "image_token_index", where,
                    optional=False)
    cfg = blip2_config(model_type, vision=vision, text=text, projector=projector,
                       image_token_index=image_token)
    declared = hf.get("use_decoder_only_language_model")
    if declared is not None and bool(declared) == is_encoder_decoder(cfg):
        kind = "an encoder-decoder" if is_encoder_decoder(cfg) else "a decoder-only"
        raise InvalidConfigError(
            f"{where}: use_decoder_only_language_model = {declared!r}, but text_config is "
            f"{kind} LLM ({text_type}); the config is damaged or was edited; restore it")
    if model_type == "blip2":
        cfg.image_text_hidden_size = hf.get("image_text_hidden_size", 256)
    return cfg


def to_hf(cfg) -> dict:
    """HF's config.json dict (the vision tower's, the Q-Former's and the LLM's sections)."""
    name = cfg.model_type
    encoder, decoder = ENCODERS.get(cfg.vision.type), DECODERS.get(cfg.text.model_type)
    if encoder.to_hf is None or decoder.to_hf is None:
        part = cfg.vision.type if encoder.to_hf is None else cfg.text.model_type
        raise UnsupportedModelError(f"{part!r} has no HF config mapping; save_hf cannot write "
                                    "this model (save_orbax can)")
    vision = dict(encoder.to_hf(cfg.vision), model_type=VISION_MODEL_TYPES[name])
    qformer = qformer_to_hf(cfg.projector)
    hf = {
        "model_type": HF_MODEL_TYPES[name], "architectures": [ARCHITECTURES[name]],
        "vision_config": vision, "qformer_config": qformer,
        "text_config": decoder.to_hf(cfg.text),
        "num_query_tokens": cfg.projector.num_query_tokens,
        "image_token_index": cfg.image_token_index,
        "use_decoder_only_language_model": not is_encoder_decoder(cfg),
        "initializer_factor": 1.0, "initializer_range": 0.02,
    }
    if name == "blip2":
        hf["image_text_hidden_size"] = cfg.image_text_hidden_size
    return hf


def check(cfg, where: str = "model config") -> None:
    """The encoder's, the Q-Former's, the decoder's and the composition's constraints."""
    encoder, decoder = ENCODERS.get(cfg.vision.type), DECODERS.get(cfg.text.model_type)
    if encoder.check is not None:
        encoder.check(cfg.vision, f"{where} vision")
    if decoder.check is not None:
        decoder.check(cfg.text, f"{where} text")
    check_qformer(cfg.projector, f"{where} projector")
    checks.token_id(cfg, "image_token_index", where, optional=False)
    checks.one_of(cfg.projector, "model_type", f"{where} projector",
                  (QFORMER_TYPES[cfg.model_type],))
    width = (encoder.feature_size(cfg) if encoder.feature_size is not None
             else cfg.vision.hidden_size)
    if cfg.projector.encoder_hidden_size != width:
        raise InvalidConfigError(
            f"{where}: projector.encoder_hidden_size = {cfg.projector.encoder_hidden_size} "
            f"must be the vision tower's width {width} (the Q-Former cross-attends to its "
            "features); the config is damaged or was edited; restore it")


# Spellings of keys in other writers' checkpoints -> ours (none known: transformers 4 and 5
# and the published checkpoints spell them as we do).
KEY_ALIASES = ()


def _lm_family(cfg):
    """The model family that reads the LLM on its own (causal_lm for the decoder-only
    ones), if one is registered for the text model_type."""
    own = MODELS.get(cfg.model_type)
    for _, fam in MODELS.items():
        if fam is not own and fam.from_hf is not None \
                and cfg.text.model_type in fam.hf_model_types():
            return fam
    return None


def unused_keys(cfg) -> list:
    """Checkpoint keys the model does not read: those the LLM's own family skips (e.g. the
    stored copy of a tied output head), under `language_model.`."""
    fam = _lm_family(cfg)
    if fam is None:
        return []
    lm = mc.llm_config(cfg.text)
    return [r"^language_model\." + p[1:] if p.startswith("^") else p
            for p in fam.unused_keys(lm)]
