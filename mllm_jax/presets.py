"""Named model configs. `get(name)` returns a fresh ConfigDict; `names()` lists them.

The 7B/13B presets mirror the published HF configs (parameter counts are checked against
transformers models built on the meta device).
"""
import ml_collections

from mllm_jax import config as mc

_PRESETS = {}


def register(name):
    def wrap(fn):
        _PRESETS[name] = fn
        return fn
    return wrap


def get(name: str) -> ml_collections.ConfigDict:
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(names())}")
    return _PRESETS[name]()


def names():
    return sorted(_PRESETS)


# ---- vision towers -------------------------------------------------------------------------

def clip_l14(image_size=224):
    return mc.vision_config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=image_size, patch_size=14)


def tiny_clip():
    return mc.vision_config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, image_size=28, patch_size=7)


register("clip-vit-l-14")(lambda: mc.clip_vision_model_config(clip_l14(224)))
register("clip-vit-l-14-336")(lambda: mc.clip_vision_model_config(clip_l14(336)))
register("tiny-clip")(lambda: mc.clip_vision_model_config(tiny_clip()))


def _siglip(**kw):
    from mllm_jax.models.encoders.siglip import siglip_vision_config, siglip_vision_model_config
    return siglip_vision_model_config(siglip_vision_config(**kw))


# google/siglip-so400m-patch14-384 (the tower of PaliGemma, LLaVA-OneVision, Idefics3) and
# google/siglip-base-patch16-224 (transformers' SiglipVisionConfig defaults).
register("siglip-so400m-patch14-384")(lambda: _siglip(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    image_size=384, patch_size=14))
register("siglip-base-patch16-224")(_siglip)

# ---- language models -----------------------------------------------------------------------


def llama2_7b(vocab_size=32000):
    return mc.text_config(vocab_size=vocab_size, max_position_embeddings=4096, rms_norm_eps=1e-5)


def llama2_13b(vocab_size=32000):
    return mc.text_config(vocab_size=vocab_size, hidden_size=5120, intermediate_size=13824,
                          num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                          max_position_embeddings=4096, rms_norm_eps=1e-5)


def llama3_8b():
    return mc.text_config(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                          rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                          bos_token_id=128000, eos_token_id=128001)


def llama31_8b():
    t = llama3_8b()
    t.rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    t.max_position_embeddings = 131072
    t.eos_token_id = 128001
    return t


def mistral_7b():
    return mc.text_config(model_type="mistral", intermediate_size=14336, num_key_value_heads=8,
                          max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5)


def qwen2_7b():
    return mc.text_config(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                          intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, head_dim=128, rope_theta=1000000.0,
                          max_position_embeddings=131072, rms_norm_eps=1e-6, qkv_bias=True,
                          bos_token_id=151643, eos_token_id=151643)


def tiny_llama(**kw):
    d = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=512, rms_norm_eps=1e-5)
    d.update(kw)
    return mc.text_config(**d)


register("llama-2-7b")(lambda: mc.llm_config(llama2_7b()))
register("llama-2-13b")(lambda: mc.llm_config(llama2_13b()))
register("vicuna-7b-v1.5")(lambda: mc.llm_config(llama2_7b()))
register("vicuna-13b-v1.5")(lambda: mc.llm_config(llama2_13b()))
register("llama-3-8b")(lambda: mc.llm_config(llama3_8b()))
register("llama-3.1-8b")(lambda: mc.llm_config(llama31_8b()))
register("mistral-7b")(lambda: mc.llm_config(mistral_7b()))
register("qwen2-7b")(lambda: mc.llm_config(qwen2_7b()))
register("tiny-llama")(lambda: mc.llm_config(tiny_llama()))
register("tiny-qwen2")(lambda: mc.llm_config(tiny_llama(model_type="qwen2", qkv_bias=True)))
register("tiny-mistral")(lambda: mc.llm_config(tiny_llama(model_type="mistral",
                                                          sliding_window=8)))

# ---- LLaVA ---------------------------------------------------------------------------------


def _llava(vision, text, **kw):
    # llava-hf pads the vocabulary to 32064; <image> is 32000 and <pad> 32001.
    c = mc.llava_config(vision=vision, text=text, image_token_index=32000, **kw)
    c.text.pad_token_id = 32001
    return c


register("llava-1.5-7b")(lambda: _llava(clip_l14(336), llama2_7b(32064)))
register("llava-1.5-13b")(lambda: _llava(clip_l14(336), llama2_13b(32064)))


def _llava_next(text):
    # llava-hf's LLaVA-NeXT checkpoints: CLIP ViT-L/14-336 tiles on LlavaNextConfig's default
    # pinpoints, the vocabulary padded to 32064 (<image> 32000, <pad> 32001).
    from mllm_jax.models.llava_next import llava_next_config
    c = llava_next_config(vision=clip_l14(336), text=text, image_token_index=32000)
    c.text.pad_token_id = 32001
    return c


def mistral_7b_instruct_v02(vocab_size=32064):
    t = mistral_7b()
    t.update(vocab_size=vocab_size, rope_theta=1000000.0, sliding_window=None)
    return t


register("llava-v1.6-mistral-7b")(lambda: _llava_next(mistral_7b_instruct_v02()))
register("llava-v1.6-vicuna-7b")(lambda: _llava_next(llama2_7b(32064)))


@register("tiny-llava")
def _tiny_llava():
    v = tiny_clip()
    c = mc.llava_config(vision=v, text=tiny_llama(), image_token_index=255,
                        image_seq_length=(v.image_size // v.patch_size) ** 2)
    c.text.pad_token_id = 0
    return c


@register("llava-bench-small")
def _bench_small():
    """The training / decode benchmark model (see `mllm-jax bench`)."""
    v = mc.vision_config(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, image_size=224, patch_size=14)
    t = mc.text_config(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                       max_position_embeddings=2048, vocab_size=32000)
    c = mc.llava_config(vision=v, text=t, image_token_index=31999, image_seq_length=256)
    return c

# ---- BLIP-2 / InstructBLIP -----------------------------------------------------------------
# EVA ViT-g/14 at 224 px, a BERT-base Q-Former (cross-attention every 2nd layer) with 32
# queries, and the LLM of the published Salesforce checkpoints. Their updated config.json
# files add the processor's `<image>` token at the end of the tokenizer and resize the LLM's
# embeddings to the tokenizer's length rounded up to a multiple of 64 (blip2-opt-2.7b:
# token 50265, 50304 embeddings; Flan-T5's 32128 rows already hold token 32100).


def _blip2(model_type, text, image_token_index):
    from mllm_jax.models.blip2 import blip2_config
    from mllm_jax.models.encoders.eva import eva_vision_config
    return blip2_config(model_type, vision=eva_vision_config(), text=text,
                        image_token_index=image_token_index)


def opt_2_7b():
    from mllm_jax.models.decoders.opt import opt_text_config
    # BLIP-2 stops OPT at "\n" (id 50118), as its checkpoint's text_config says.
    return opt_text_config(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                           num_attention_heads=32, vocab_size=50304, word_embed_proj_dim=2560,
                           max_position_embeddings=2048, eos_token_id=50118)


def flan_t5_xl():
    from mllm_jax.models.decoders.t5_config import t5_text_config
    return t5_text_config(vocab_size=32128, hidden_size=2048, head_dim=64,
                          intermediate_size=5120, num_hidden_layers=24, num_decoder_layers=24,
                          num_attention_heads=32, feed_forward_proj="gated-gelu",
                          tie_word_embeddings=False, scale_decoder_outputs=False)


def vicuna_7b_instructblip():
    # Vicuna-7B v1.1 with LAVIS's added [PAD] token (id 32000) and the processor's `<image>`
    # (id 32001): 32002 tokens, 32064 embeddings.
    t = llama2_7b(vocab_size=32064)
    t.max_position_embeddings = 2048
    t.rms_norm_eps = 1e-6
    t.pad_token_id = 32000
    return t


# The image token ids: the `<image>` token the processors of the updated checkpoints add.
register("blip2-opt-2.7b")(lambda: _blip2("blip2", opt_2_7b(), 50265))
register("blip2-flan-t5-xl")(lambda: _blip2("blip2", flan_t5_xl(), 32100))
register("instructblip-vicuna-7b")(lambda: _blip2("instructblip", vicuna_7b_instructblip(),
                                                  32001))
register("instructblip-flan-t5-xl")(lambda: _blip2("instructblip", flan_t5_xl(), 32100))

# ---- Qwen2-VL ------------------------------------------------------------------------------
# Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2-VL-7B-Instruct: the same 675M-parameter ViT
# (patch 14, 2x2 merge) before a Qwen2 decoder with M-RoPE (mrope_section 16/24/24).


def _qwen2_vl(hidden, intermediate, heads, kv_heads, vocab, tied):
    from mllm_jax.models.qwen2_vl import (qwen2_vl_config, qwen2_vl_text_config,
                                          qwen2_vl_vision_config)
    text = qwen2_vl_text_config(vocab_size=vocab, hidden_size=hidden,
                                intermediate_size=intermediate, num_hidden_layers=28,
                                num_attention_heads=heads, num_key_value_heads=kv_heads,
                                rms_norm_eps=1e-6, tie_word_embeddings=tied)
    return qwen2_vl_config(vision=qwen2_vl_vision_config(hidden_size=hidden), text=text)


register("qwen2-vl-2b")(lambda: _qwen2_vl(1536, 8960, 12, 2, 151936, True))
register("qwen2-vl-7b")(lambda: _qwen2_vl(3584, 18944, 28, 4, 152064, False))


@register("qwen2.5-vl-7b")
def _qwen2_5_vl_7b():
    """Qwen/Qwen2.5-VL-7B-Instruct: window attention (112 px) in a 1280-wide tower."""
    from mllm_jax.models.qwen2_vl import qwen2_5_vl_config, qwen2_5_vl_vision_config
    c = _qwen2_vl(3584, 18944, 28, 4, 152064, False)
    c.text.max_position_embeddings = 128000
    return qwen2_5_vl_config(vision=qwen2_5_vl_vision_config(embed_dim=1280, hidden_size=3584,
                                                             tokens_per_second=2),
                             text=c.text)
