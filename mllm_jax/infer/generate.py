"""Autoregressive generation: the loop. The model decodes itself (`init_cache`, `prefill`,
`decode_step`: see `models.llm.CausalLM`); this file only prefills, samples
(`infer.sampling`) and loops, all under `jax.jit` with static shapes. Beam search is
`infer.beam_search`.

The cache holds `max_len = prompt_len + max_new_tokens` slots per layer. Prompts are left
padded, so every sample writes the same slot at every step (one shared write index); padded
slots are masked out of attention by the prompt's attention mask, and RoPE positions come
from the mask's cumulative sum, as in HF `generate`. Images are merged into the prompt
embeddings at prefill only.

On a mesh the parameters are laid out by `sharding.SERVING_RULES` (tensor-parallel, never
gathered per token) unless told otherwise. The compute dtype (activations and the KV cache)
is the model's config `dtype`; `generate(dtype=...)` changes it for one call without
touching the stored parameters.
"""
import contextlib
import copy
import json
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax import sharding
from mllm_jax.convert.hf_io import abstract_params
from mllm_jax.infer.beam_search import beam_generate
from mllm_jax.infer.sampling import sample_logits
from mllm_jax.models import build_model, registry
from mllm_jax.models.llava import check_image_tokens
from mllm_jax.models.llm import cache_kv_mask


def _ends_with_stop(out, step, stops):
    """[b] bool: the tokens generated up to `step` end with one of the `stops` sequences."""
    hit = jnp.zeros((out.shape[0],), bool)
    for seq in stops:
        m = len(seq)
        if m > out.shape[1]:
            continue
        tail = jax.lax.dynamic_slice_in_dim(out, jnp.maximum(step - m + 1, 0), m, axis=1)
        hit = hit | ((step + 1 >= m) & jnp.all(tail == jnp.asarray(seq, jnp.int32), axis=1))
    return hit


def _generate(model, settings, params, input_ids, attention_mask, pixel_values, model_inputs,
              rng):
    max_new, eos_ids, pad_id, sampling, stops = settings
    b, s = input_ids.shape
    cache = model.init_cache(b, s + max_new)
    logits, cache, last_pos = model.apply({"params": params}, input_ids, attention_mask, cache,
                                          pixel_values, method="prefill", **model_inputs)
    kv_mask = cache_kv_mask(attention_mask, s + max_new)
    eos = jnp.asarray(eos_ids, jnp.int32)
    sample = partial(sample_logits, **dict(sampling))

    def emit(step, logits, out, finished):
        tok = sample(logits, jax.random.fold_in(rng, step))
        tok = jnp.where(finished, pad_id, tok)
        out = out.at[:, step].set(tok)
        finished = finished | jnp.isin(tok, eos) | _ends_with_stop(out, step, stops)
        return tok, out, finished

    out = jnp.full((b, max_new), pad_id, jnp.int32)
    tok, out, finished = emit(0, logits, out, jnp.zeros((b,), bool))

    def cond(carry):
        step, _, _, finished, _, _ = carry
        return (step < max_new) & ~jnp.all(finished)

    def body(carry):
        step, tok, out, finished, pos, cache = carry
        pos = pos + 1
        logits, cache = model.apply({"params": params}, tok, pos, kv_mask, cache,
                                    method="decode_step")
        tok, out, finished = emit(step, logits, out, finished)
        return step + 1, tok, out, finished, pos, cache

    step, _, out, _, _, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(1), tok, out, finished, last_pos, cache))
    return out, step


def _text_limits(model):
    """(vocabulary size, context length) of the model's decoder, None where not known."""
    text = model.cfg.get("text")
    if text is None:
        return None, None
    return text.get("vocab_size"), text.get("max_position_embeddings")


def check_prompts(model, input_ids, attention_mask=None) -> np.ndarray:
    """Host-side checks of prompts before anything runs: every real token (attention mask 1)
    is a token id of the model (0 <= id < vocab_size, or its image token id), and no prompt
    (image tokens included) is longer than the model's context (max_position_embeddings).
    A ValueError names the bad id and its position, or the prompt's length, its image
    tokens and the limit. Returns the ids with padded positions (mask 0) holding an id out of
    range set to 0 (they are masked out, but a gather past the table gives NaN)."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    mask = np.ones(ids.shape, bool) if attention_mask is None else \
        np.asarray(attention_mask).reshape(ids.shape) != 0
    vocab, context = _text_limits(model)
    image_id = registry.image_token_id(model.cfg)
    if vocab is not None:
        bad = (ids < 0) | (ids >= vocab)
        if image_id is not None:
            bad &= ids != image_id
        real = bad & mask
        if real.any():
            row, col = (int(x) for x in np.argwhere(real)[0])
            allowed = "" if image_id is None or image_id < vocab else \
                f" or the image token id {image_id}"
            raise ValueError(
                f"input_ids[{row}, {col}] = {int(ids[row, col])} is not a token id of this "
                f"model: ids must be in [0, {vocab}) (vocab_size {vocab}){allowed}; "
                f"{int(real.sum())} such id(s) in the prompts. Check that the tokenizer is "
                f"the checkpoint's own")
        if bad.any():
            ids = np.where(bad, 0, ids).astype(ids.dtype)
    if context is not None:
        lengths = mask.sum(axis=1)
        row = int(np.argmax(lengths))
        if lengths[row] > context:
            images = 0 if image_id is None else int(((ids[row] == image_id) & mask[row]).sum())
            which = "the prompt" if len(ids) == 1 else f"prompt {row}"
            raise ValueError(
                f"{which} is {int(lengths[row])} tokens long ({images} of them image "
                f"tokens), longer than the model's context of {context} positions "
                f"(max_position_embeddings); shorten the prompt or the conversation, or "
                f"give fewer images")
    return ids


def check_position_table(model, attention_mask, max_new_tokens: int) -> None:
    """A decoder whose positions are rows of a learned table (OPT) has no position past
    `max_position_embeddings`: the longest prompt plus `max_new_tokens` must fit in it
    (a ValueError naming the lengths, instead of reading outside the table)."""
    text = model.cfg.get("text")
    if text is None or not registry.DECODERS.get(text.model_type).learned_positions:
        return
    longest = int(np.max(np.sum(np.asarray(attention_mask) != 0, axis=1)))
    table = int(text.max_position_embeddings)
    if longest + max_new_tokens > table:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} "
            f"needs {longest + max_new_tokens} positions, but this model's {text.model_type} "
            f"decoder has a learned table of {table} (max_position_embeddings); lower "
            f"max_new_tokens to at most {max(table - longest, 0)} or shorten the prompt")


# The compute dtypes a model runs in (`generate(dtype=)`, `--dtype` of eval, chat, generate).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype_name(dtype, option: str = "dtype"):
    """The name of compute dtype `dtype` (a name, or a numpy / jax dtype), None for None; a
    ValueError naming `option` and the accepted values for anything else."""
    if dtype is None:
        return None
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"{option} must be one of {', '.join(COMPUTE_DTYPES)} (the compute "
                         f"and KV-cache dtype), got {dtype!r}")
    return name


def with_compute_dtype(model, dtype):
    """`model` computing in `dtype`: its activations, matmuls and KV cache. It is built anew
    from the config with `dtype` set; its `param_dtype` is unchanged, so the same parameter
    tree serves it as stored (the layers cast each weight at use) and nothing is copied.
    None, or the model's own dtype: `model` itself."""
    name, own = compute_dtype_name(dtype), model.cfg.get("dtype")
    if name is None or (own is not None and jnp.dtype(own).name == name):
        return model
    cfg = copy.deepcopy(model.cfg)
    cfg.dtype = name
    return build_model(cfg)


_COMPILED = {}  # (model class, model config, loop, settings, rules) -> jitted loop


def model_key(model):
    """A hashable identity of what a model computes: its class and its config, frozen as
    sorted JSON. Two modules built from equal configs share compiled programs."""
    return type(model).__qualname__, json.dumps(model.cfg.to_dict(), sort_keys=True,
                                                default=str)


def _compiled(model, settings, fn=None, rules=None):
    """The jitted loop; `rules` (the activation rules it is traced under) are part of the
    key, since jit does not see them."""
    fn = _generate if fn is None else fn
    key = (model_key(model), fn.__name__, settings, rules)
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(partial(fn, model, settings))
    return _COMPILED[key]


def generate(model, params, input_ids, attention_mask=None, pixel_values=None, *,
             max_new_tokens: int, eos_token_id: int | Sequence[int] | None,
             pad_token_id: int | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, stop_sequences=(), rng=None,
             mesh=None, rules=None, dtype=None, **model_inputs) -> np.ndarray:
    """Generates up to `max_new_tokens` tokens per prompt. Returns int32 [b, n] (new tokens
    only); n < max_new_tokens when every sample emitted an EOS earlier. After its EOS a
    sample holds `pad_token_id` (default: the first EOS id), as HF `generate` does.

    input_ids: [b, s] prompts, LEFT padded; attention_mask: [b, s] (1 = real token; None =
    no padding). Real tokens must be ids of the model and prompts no longer than its
    context (`check_prompts`, a ValueError before anything runs); padded positions may hold
    any id. pixel_values (LLaVA): NHWC [n_images, h, w, c], images in the order their
    (already expanded) image tokens appear in the flattened batch, any number per prompt.
    Sampling: do_sample=False is greedy; otherwise temperature, top_k (0 = off), top_p
    (1.0 = off) as HF applies them, drawn from `rng` (a jax PRNG key; default key 0).
    Beam search (num_beams > 1, deterministic): HF's beam search with its `length_penalty`
    (the exponent of the generated length dividing a finished hypothesis' log-probability)
    and `early_stopping` (False: HF's heuristic; True: stop when `num_beams` hypotheses are
    done; "never": the canonical search); returns the best hypothesis per prompt.

    stop_sequences: token-id sequences that end a sample like an EOS does (kept in the
    output, as HF keeps a stop string); greedy and sampling only.
    model_inputs: further arrays the model's `prefill` takes by keyword, under the HF
    forward's names (InstructBLIP's `qformer_input_ids` / `qformer_attention_mask`), each
    with the prompts' batch as its first axis.
    mesh: a `jax.sharding.Mesh` (`mllm_jax.sharding.make_mesh`) to decode on, with the
    parameters sharded by `rules` and the prompts split over the data axes; the tokens
    equal those of a one-device run.
    rules: the logical-axis rules table on the mesh; None: `sharding.SERVING_RULES`
      (weights tensor-parallel and replicated over data/fsdp, so no decode step gathers a
      weight). `sharding.LOGICAL_RULES` lays them out as training does.
    dtype: the compute and KV-cache dtype, one of COMPUTE_DTYPES (e.g. jnp.bfloat16); the
      parameters are used as stored, never cast as a tree. None: the model's own (its
      config's `dtype`, float32 unless set).
    """
    model = with_compute_dtype(model, compute_dtype_name(dtype, "generate(dtype=...)"))
    rules = sharding.SERVING_RULES if rules is None else tuple(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in rules)
    traced_rules = rules if mesh is not None else None  # the rules apply on a mesh only
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if np.any(np.asarray(attention_mask)[:, -1] == 0):
        raise ValueError("prompts must be LEFT padded (attention_mask[:, -1] == 1 for all)")
    input_ids = check_prompts(model, input_ids, attention_mask)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_position_table(model, attention_mask, max_new_tokens)
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and do_sample:
        raise ValueError("beam search here is deterministic; use num_beams=1 with do_sample, "
                         "or do_sample=False with num_beams > 1")
    stops = tuple(tuple(int(t) for t in seq) for seq in stop_sequences)
    if any(len(seq) == 0 for seq in stops):
        raise ValueError("stop_sequences must not contain an empty sequence")
    if stops and num_beams > 1:
        raise ValueError("stop_sequences work with greedy decoding and sampling; beam search "
                         "ends hypotheses at eos_token_id only")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got "
                         f"{early_stopping!r}")
    eos = () if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist())
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if not registry.generates(model.cfg):
        raise ValueError(f"model_type {model.cfg.model_type!r} does not generate text")
    if pixel_values is not None and not registry.is_multimodal(model.cfg):
        raise ValueError("this is a text-only model; pixel_values must be None")
    model_inputs = {k: v for k, v in model_inputs.items() if v is not None}
    prepare = registry.family(model.cfg).prepare_image_inputs
    if prepare is not None:
        pixel_values, model_inputs = prepare(model.cfg, input_ids, pixel_values, model_inputs)
    elif pixel_values is not None:
        pixel_values = jnp.asarray(pixel_values)
        per_image = registry.tokens_per_image(model.cfg, pixel_values.shape[-3:-1])
        check_image_tokens(np.asarray(input_ids), pixel_values.shape[0], per_image,
                           registry.image_token_id(model.cfg))
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.asarray(attention_mask, jnp.int32)
    model_inputs = {k: jnp.asarray(v) for k, v in model_inputs.items()}
    for name, value in model_inputs.items():
        if prepare is None and value.shape[:1] != ids.shape[:1]:
            raise ValueError(f"{name} has shape {value.shape}; its first axis must be the "
                             f"batch of {ids.shape[0]} prompts")
    if mesh is not None:
        params, ids, mask, pixel_values, model_inputs = place_on_mesh(
            model, params, mesh, ids, mask, pixel_values, model_inputs, rules=rules)
    if num_beams > 1:
        # HF fills unused beam positions with `pad_token_id or eos_token_id[0]`: a pad id
        # of 0 counts as unset there.
        beam_pad = pad if (pad or not eos) else eos[0]
        settings = (int(max_new_tokens), eos, int(beam_pad), int(num_beams),
                    float(length_penalty), early_stopping)
        fn, args = _compiled(model, settings, beam_generate, traced_rules), ()
    else:
        sampling = (("do_sample", bool(do_sample)), ("temperature", float(temperature)),
                    ("top_k", int(top_k)), ("top_p", float(top_p)))
        settings = (int(max_new_tokens), eos, int(pad), sampling, stops)
        fn = _compiled(model, settings, rules=traced_rules)
        args = (jax.random.PRNGKey(0) if rng is None else rng,)
    with contextlib.ExitStack() as stack:
        if mesh is not None:
            stack.enter_context(jax.set_mesh(mesh))  # makes the logical constraints apply
            stack.enter_context(sharding.activation_rules_context(rules))
        out, *rest = fn(params, ids, mask, pixel_values, model_inputs, *args)
    # Beam search returns the best hypotheses' lengths, the loop the number of steps run.
    n = int(np.max(np.asarray(rest[0]))) if num_beams > 1 else int(rest[0])
    return np.asarray(out)[:, :n]


def place_on_mesh(model, params, mesh, input_ids, attention_mask, pixel_values=None,
                  model_inputs=None, *, rules=sharding.LOGICAL_RULES):
    """Parameters sharded by `rules` (default: the training table; `generate` passes
    `sharding.SERVING_RULES`); prompts and images split over the (data, fsdp) axes when
    their count divides, replicated otherwise."""
    params = jax.device_put(params, sharding.param_shardings(
        abstract_params(model, boxed=True), mesh, rules))
    ways = mesh.shape["data"] * mesh.shape["fsdp"]

    def split(x):
        if x is None:
            return None
        sh = (sharding.batch_sharding(mesh, x.ndim) if x.shape[0] % ways == 0
              else sharding.replicated(mesh))
        return jax.device_put(x, sh)
    inputs = {k: split(v) for k, v in (model_inputs or {}).items()}
    return params, split(input_ids), split(attention_mask), split(pixel_values), inputs
