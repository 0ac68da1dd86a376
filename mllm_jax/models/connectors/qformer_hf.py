"""The Q-Former connector <-> HF: its config (`Blip2QFormerConfig` /
`InstructBlipQFormerConfig`, the `qformer_config` of BLIP-2 and InstructBLIP) and its tensors.

Tensor names follow from the parameter paths by the fixed rules of `convert.hf_keys`
(`encoder/layer_0/attention/attention/query/kernel` is `encoder.layer.0.attention.attention.
query.weight`, transposed); `query_tokens` keeps HF's shape [1, q, d]. Under a composed HF
model the connector's tensors are `query_tokens`, `qformer.*` and `language_projection.*`,
the names `QFormerConnector`'s paths give with no prefix.
"""
import re
from typing import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.models import checks
from mllm_jax.models.connectors.qformer import MODEL_TYPES, QFormerModel, qformer_config
from mllm_jax.models.registry import InvalidConfigError, UnsupportedModelError

# transformers' defaults for both config classes: HF writes only the fields that differ.
QFORMER_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                        num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                        max_position_embeddings=512, layer_norm_eps=1e-12, pad_token_id=0,
                        cross_attention_frequency=2, encoder_hidden_size=1408,
                        initializer_range=0.02)
BLIP2_ONLY = dict(use_qformer_text_input=False)


def check_qformer(q, where: str = "qformer config") -> None:
    """The Q-Former's constraints on a config (or a dict of its fields)."""
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "cross_attention_frequency",
                 "encoder_hidden_size", "num_query_tokens"):
        checks.positive_int(q, name, where)
    checks.layer_count(q, "num_hidden_layers", where)
    checks.divides(q, "num_attention_heads", "hidden_size", where)
    checks.positive_number(q, "layer_norm_eps", where)
    checks.one_of(q, "model_type", where, MODEL_TYPES)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        p = q[name]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise InvalidConfigError(f"{where}: {name} = {p!r} must be a probability in "
                                     "[0, 1); the config is damaged or was edited; restore it")


def qformer_from_hf(hf: dict, *, num_query_tokens: int = 32, encoder_hidden_size=None,
                    where: str = "config.json qformer_config"):
    """Our connector config for an HF Q-Former config dict. `num_query_tokens` is the
    composed config's field; `encoder_hidden_size`, when given, replaces the stored one, as
    HF's Blip2Config / InstructBlipConfig set it from the vision tower's width."""
    if not isinstance(hf, dict):
        raise InvalidConfigError(f"{where} must be a JSON object, not {hf!r}")
    model_type = hf.get("model_type", "blip_2_qformer")
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(f"{where}: Q-Former model_type {model_type!r} is not "
                                    f"supported (supported: {', '.join(MODEL_TYPES)})")
    position_type = hf.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise UnsupportedModelError(f"{where}: position_embedding_type {position_type!r} is "
                                    "not supported (only 'absolute', as transformers)")
    d = dict(QFORMER_DEFAULTS, **(BLIP2_ONLY if model_type == "blip_2_qformer" else {}))
    d.update({k: hf[k] for k in d if k in hf})
    if encoder_hidden_size is not None:
        d["encoder_hidden_size"] = encoder_hidden_size
    d.update(model_type=model_type, num_query_tokens=num_query_tokens)
    check_qformer(d, where)  # before anything is built from the values
    return qformer_config(**d)


def qformer_to_hf(q) -> dict:
    """HF's `qformer_config` dict (`num_query_tokens` belongs to the composed config)."""
    fields = dict(QFORMER_DEFAULTS, **(BLIP2_ONLY if q.model_type == "blip_2_qformer" else {}))
    return {"model_type": q.model_type, **{k: q[k] for k in fields}}


# ---- tensors ---------------------------------------------------------------------------------

def abstract_qformer_params(q):
    """Shapes of `QFormerModel(q)`'s parameters (nothing allocated)."""
    query = jnp.zeros((1, q.num_query_tokens, q.hidden_size), jnp.float32)
    feats = jnp.zeros((1, 1, q.encoder_hidden_size), jnp.float32)
    ids = jnp.zeros((1, 1), jnp.int32) if q.model_type == "instructblip_qformer" else None
    shapes = jax.eval_shape(QFormerModel(q).init, jax.random.PRNGKey(0), query, feats,
                            input_ids=ids)
    return flax.core.meta.unbox(shapes["params"])


def params_from_hf(tensors: Mapping[str, np.ndarray], abstract, prefix: str = "",
                   dtype=None):
    """The parameter tree shaped like `abstract` from HF tensors (torch layout) named
    `prefix` + HF name, e.g. the `state_dict()` of a `Blip2QFormerModel` (prefix "") or of a
    `Blip2ForConditionalGeneration` (prefix "qformer."). Keys under `prefix` that the tree
    does not hold, missing keys and wrong shapes are errors naming every one."""
    from mllm_jax.convert import hf_keys  # here: mllm_jax.convert imports the models
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(abstract))
    names = {prefix + hf_keys.hf_name(p): p for p in flat}
    present = {k for k in tensors if k.startswith(prefix)
               and not any(re.search(r, k) for r in hf_keys.IGNORED_KEYS)}
    problems = []
    if missing := sorted(set(names) - present):
        problems.append(f"missing {', '.join(missing)}")
    if unexpected := sorted(present - set(names)):
        problems.append(f"unexpected {', '.join(unexpected)}")
    out = {}
    for key, p in names.items():
        if key not in tensors:
            continue
        want = hf_keys.hf_shape(p, flat[p].shape)
        got = tuple(np.shape(tensors[key]))
        if got != want:
            problems.append(f"{key} has shape {list(got)}, the config gives {list(want)}")
            continue
        arr = hf_keys.from_hf_layout(p, np.asarray(tensors[key]))
        out[p] = jnp.asarray(arr, dtype=dtype or arr.dtype)
    if problems:
        raise ValueError("Q-Former tensors do not match the config: " + "; ".join(problems)
                         + ". Check that the config belongs to this checkpoint")
    return flax.traverse_util.unflatten_dict(out)


def params_to_hf(params, prefix: str = "") -> dict:
    """{prefix + HF name: numpy array in torch layout} for a parameter tree."""
    from mllm_jax.convert import hf_keys
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(params))
    return {prefix + hf_keys.hf_name(p): np.ascontiguousarray(
        hf_keys.to_hf_layout(p, np.asarray(jax.device_get(v)))) for p, v in flat.items()}
