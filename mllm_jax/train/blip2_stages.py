"""The training configs of BLIP-2's stage 2 and InstructBLIP's instruction tuning
(`configs/blip2_*_stage2.py`, `configs/instructblip_*.py`), on the `blip2` / `instructblip`
families. In both the query tokens, the Q-Former and the language projection train; the
vision tower and the LLM stay frozen (stored in 16 bit).

BLIP-2 stage 2 (Li et al. 2023, sec. 3.4): generative pre-training on image-caption pairs,
AdamW (0.9, 0.98), weight decay 0.05, peak learning rate 1e-4 after 2k linear warmup steps,
cosine decay to 5e-5, 80k steps, batch 1920 (OPT) / 1520 (Flan-T5). Set
init.orbax_checkpoint to a blip2 tree whose Q-Former comes from stage 1
(`models.blip2_qformer.copy_qformer`).

InstructBLIP (Dai et al. 2023, sec. 3.5): instruction tuning from the BLIP-2 checkpoint,
AdamW (0.9, 0.999), weight decay 0.05, learning rate 1e-5 after 1k linear warmup steps,
cosine decay to 0, at most 60k steps, batch 192 / 128 / 64 for the 3B / 7B / 11-13B LLMs.

The trainer's `lm` objective is a decoder-only LLM's next-token loss: these recipes are for
OPT and LLaMA/Vicuna LLMs (a Flan-T5 LLM's prefix-LM loss needs decoder inputs in the batch,
which the pipeline does not build).
"""
import ml_collections

from mllm_jax import presets
from mllm_jax.models.blip2 import is_encoder_decoder
from mllm_jax.train import recipe

# The parts that train in both stages; the vision tower and the LLM stay frozen.
QFORMER = r"^(query_tokens$|qformer/|language_projection/)"


def _check_decoder_only(model, preset: str):
    if is_encoder_decoder(model):
        raise ValueError(f"preset {preset!r} has an encoder-decoder LLM ({model.text.model_type}"
                         "): the `lm` objective trains decoder-only LLMs (OPT, LLaMA); use an "
                         "OPT or Vicuna preset")


def _base(preset: str, name: str) -> ml_collections.ConfigDict:
    c = recipe.base("tiny-llava")
    c.model = presets.get(preset)
    _check_decoder_only(c.model, preset)
    c.model.dtype = "bfloat16"
    c.stage.update(name=name, trainable=[QFORMER], objective="lm", frozen_dtype="bfloat16")
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.data.update(source="llava_json", images=1, workers=8)
    return c


def blip2_stage2(preset: str = "blip2-opt-2.7b", batch: int = 1920) -> ml_collections.ConfigDict:
    c = _base(preset, "blip2_stage2")
    c.train.update(global_batch_size=batch, num_steps=80_000, lr=1e-4, warmup_steps=2000,
                   end_lr_ratio=0.5, weight_decay=0.05, b1=0.9, b2=0.98, eps=1e-8,
                   grad_clip=0.0, checkpoint_every=5000, log_every=50)
    # Captions after the image tokens, nothing else: the `plain` template.
    c.data.update(template="plain", max_length=32 + c.model.projector.num_query_tokens + 2)
    return c


def instructblip(preset: str = "instructblip-vicuna-7b", batch: int = 128
                 ) -> ml_collections.ConfigDict:
    c = _base(preset, "instructblip")
    c.train.update(global_batch_size=batch, num_steps=60_000, lr=1e-5, warmup_steps=1000,
                   end_lr_ratio=0.0, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
                   grad_clip=0.0, checkpoint_every=5000, log_every=50)
    # LAVIS feeds the instruction as bare text after the query tokens; the nearest framing
    # the pipeline has is Vicuna's own conversation template.
    c.data.update(template="vicuna_v1", max_length=512)
    return c
