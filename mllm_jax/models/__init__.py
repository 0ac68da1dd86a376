"""Linen modules: encoders, connectors, decoders, and the composed MLLMs, with the registry
that builds them from configs (`build_model`) and answers what the rest of the package asks
of a model (`tokens_per_image`, `is_multimodal`, ...).

Importing this package registers the built-in families: encoders `clip`, `eva`, `siglip`;
connectors `linear`, `mlp2x_gelu`, `qformer`; decoders `llama`, `mistral`, `qwen2`, `opt`,
`t5` (encoder-decoder); models `llava`, `llava_next`, `causal_lm`, `seq2seq_lm`,
`clip_vision`, `siglip_vision`, `blip2`, `instructblip`, `blip2_qformer` (BLIP-2's stage-1
Q-Former pre-training), `qwen2_vl` and `qwen2_5_vl` (with their encoders `qwen2_vl_vision`,
`qwen2_5_vl_vision`); checkpoint layout
`llava_repo` (the LLaVA repository's checkpoints, read into `llava`). A new family is a
module plus a `registry.register_*` call.
"""
from mllm_jax.models import (blip2, blip2_qformer, connectors, decoders,  # noqa: F401
                             encoders, llava_next, llava_repo, qwen2_vl)  # (registrations)
from mllm_jax.models.llava import Llava
from mllm_jax.models.llm import CausalLM
from mllm_jax.models.registry import (CheckpointLayout, ConnectorSpec, DecoderSpec, EncoderSpec,
                                      InvalidConfigError, ModelFamily,
                                      UnsupportedModelError, build_model, check_config,
                                      generates, image_token_id, init_inputs, is_multimodal,
                                      register_connector, register_decoder,
                                      register_encoder, register_layout, register_model,
                                      tokens_per_image)
from mllm_jax.models.vit import VisionModel

__all__ = ["build_model", "tokens_per_image", "is_multimodal", "image_token_id", "generates",
           "init_inputs", "register_encoder", "register_connector", "register_decoder",
           "register_model", "register_layout", "CheckpointLayout", "EncoderSpec",
           "ConnectorSpec", "DecoderSpec", "ModelFamily",
           "UnsupportedModelError", "InvalidConfigError", "check_config", "Llava", "CausalLM",
           "VisionModel"]
