"""A decoder-only LLM on its own (`model_type` causal_lm): `LlamaForCausalLM` and friends.

Parameter paths mirror HF: `model/embed_tokens`, `model/layers_{i}/...`, `model/norm`,
`lm_head` (absent when embeddings are tied) for LLaMA; the decoder family (`DECODERS`) owns
everything under `model` and gives `embed`, `embedding_table` and `attend` (the tied head).
The model decodes itself: `init_cache`, `prefill` and `decode_step` are what `infer/` loops
over.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mllm_jax import config as mc
from mllm_jax.models.decoders.llama import LlamaModel  # noqa: F401  (public name)
from mllm_jax.models.layers import Dense, dtype_of
from mllm_jax.models.registry import DECODERS, ModelFamily, register_model


def prefill_positions(attention_mask):
    """RoPE positions of a left-padded prompt: the cumulative count of real tokens (0 on
    padding), as HF `generate` computes them."""
    positions = jnp.cumsum(attention_mask, axis=1) - 1
    return jnp.where(attention_mask == 0, 0, positions).astype(jnp.int32)


def cache_kv_mask(attention_mask, max_len: int):
    """[b, max_len]: the prompt's mask, then 1 for every slot generation will write."""
    b, s = attention_mask.shape
    return jnp.concatenate([attention_mask.astype(jnp.int32),
                            jnp.ones((b, max_len - s), jnp.int32)], axis=1)


class CausalLM(nn.Module):
    """Logits [batch, seq, vocab]; the decoder is `DECODERS[cfg.text.model_type]`."""

    cfg: Any  # model config with a `text` section

    def setup(self):
        c = self.cfg
        decoder = DECODERS.get(c.text.model_type)
        self.model = decoder.module(c.text, dtype_of(c.dtype), dtype_of(c.param_dtype),
                                    c.scan_layers, c.remat_policy, c.get("attention", "xla"))
        if not c.text.tie_word_embeddings:
            self.lm_head = Dense(c.text.vocab_size, ("embed", "vocab"), use_bias=False,
                                 dtype=dtype_of(c.dtype), param_dtype=dtype_of(c.param_dtype))

    def embed(self, input_ids):
        return self.model.embed(input_ids)

    def decode(self, inputs_embeds, attention_mask=None, segment_ids=None, position_ids=None):
        """Final (normed) hidden states for given input embeddings."""
        return self.model(inputs_embeds, attention_mask, segment_ids, position_ids)

    def hidden_states(self, input_ids=None, pixel_values=None, attention_mask=None, *,
                      inputs_embeds=None, segment_ids=None, position_ids=None):
        """Final (normed) hidden states [b, s, d]; `logits_from_hidden` finishes the job."""
        if pixel_values is not None:
            raise ValueError("this is a text-only model; pixel_values must be None")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        return self.decode(inputs_embeds, attention_mask, segment_ids, position_ids)

    def output_head(self):
        """(weight, vocab_major) of the output projection in the compute dtype: the lm_head
        kernel [d, vocab], or the tied embedding [vocab, d]."""
        dtype = dtype_of(self.cfg.dtype)
        if self.cfg.text.tie_word_embeddings:
            return self.model.embedding_table().astype(dtype), True
        return self.lm_head.variables["params"]["kernel"].astype(dtype), False

    def logits_from_hidden(self, h):
        if self.cfg.text.tie_word_embeddings:
            return self.model.attend(h)
        return self.lm_head(h)

    def __call__(self, input_ids=None, pixel_values=None, attention_mask=None, *,
                 inputs_embeds=None, segment_ids=None, position_ids=None):
        h = self.hidden_states(input_ids, pixel_values, attention_mask,
                               inputs_embeds=inputs_embeds, segment_ids=segment_ids,
                               position_ids=position_ids)
        return self.logits_from_hidden(h)

    # ---- decoding: the cache is the decoder's; see `infer.generate` for the loop ----------

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int) -> dict:
        """An empty KV cache for `batch` sequences of up to `max_len` tokens."""
        c = self.cfg
        return DECODERS.get(c.text.model_type).init_cache(c.text, batch, max_len,
                                                          dtype_of(c.dtype), c.scan_layers)

    @nn.nowrap
    def reorder_cache(self, cache, rows) -> dict:
        """The cache with its batch rows gathered by `rows` (beam search)."""
        c = self.cfg
        return DECODERS.get(c.text.model_type).reorder_cache(cache, rows, c.scan_layers)

    def prefill(self, input_ids, attention_mask, cache, pixel_values=None, *,
                inputs_embeds=None):
        """Fills the first prompt_len slots of an empty cache with a LEFT-padded prompt.
        Returns (float32 logits of the last prompt slot [b, vocab], cache, RoPE positions of
        the last prompt token [b])."""
        if pixel_values is not None:
            raise ValueError("this is a text-only model; pixel_values must be None")
        embeds = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        positions = prefill_positions(attention_mask)
        max_len = cache["k"][0].shape[-2]
        h, cache = self.model(embeds, position_ids=positions, cache=cache,
                              kv_mask=cache_kv_mask(attention_mask, max_len), prefill=True)
        return self.logits_from_hidden(h[:, -1]).astype(jnp.float32), cache, positions[:, -1]

    def decode_step(self, tokens, positions, kv_mask, cache):
        """One token per sample: tokens [b] at RoPE positions [b], written at the cache
        index; kv_mask [b, max_len] (`cache_kv_mask`). Returns (float32 logits [b, vocab],
        cache). Its cost is constant in the tokens already generated except for the
        attention read over the cache slots."""
        h, cache = self.model(self.embed(tokens[:, None]), position_ids=positions[:, None],
                              cache=cache, kv_mask=kv_mask)
        return self.logits_from_hidden(h[:, 0]).astype(jnp.float32), cache


def _check(cfg, where: str = "model config") -> None:
    check = DECODERS.get(cfg.text.model_type).check
    if check is not None:
        check(cfg.text, where)


def _from_hf(hf: dict, where: str = "config.json"):
    decoder = DECODERS.get(hf.get("model_type"))
    return mc.llm_config(decoder.from_hf(hf, where))


def _to_hf(cfg) -> dict:
    return DECODERS.get(cfg.text.model_type).to_hf(cfg.text)


def _unused_keys(cfg) -> list:
    # HF ties lm_head to embed_tokens and ignores a stored copy.
    return [r"(^|\.)lm_head\.weight$"] if cfg.text.tie_word_embeddings else []


def _train_flops(cfg, batch, seq, images_per_sample, trainable) -> float:
    """The forward pass, plus the weight gradients when anything is trained."""
    del images_per_sample
    text = DECODERS.get(cfg.text.model_type).flops(cfg.text, seq) * batch
    return text * (1 + int(bool(trainable)))


register_model("causal_lm", ModelFamily(
    module=CausalLM, config=mc.llm_config,
    init_inputs=lambda cfg: (jnp.zeros((1, 1), jnp.int32),),
    hf_model_types=lambda: tuple(n for n, d in DECODERS.items()
                                 if d.from_hf is not None and d.language_model is None),
    from_hf=_from_hf, to_hf=_to_hf,
    unused_keys=_unused_keys, train_flops=_train_flops, check=_check))
