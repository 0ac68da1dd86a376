"""Inference: answers for LLaVA-format conversations in left-padded batches (`Conversation`,
`generate_batch`, `generate_all`, with the checkpoint's image processor from
`image_config_for`), a chat with a loaded checkpoint (`Session`), the conversation template a
checkpoint records (`write_chat_template`, `read_chat_template`, `copy_chat_template`), and
HF's sampling warpers (`warp_logits`, `sample_logits`).

The KV-cache decoding loop on token ids is `mllm_jax.infer.generate.generate`. It is not
re-exported here: `mllm_jax.infer.generate` is that module, and binding the function to the
same name would hide the module (`import mllm_jax.infer.generate as m` would give the function).
"""
from mllm_jax.infer.batching import Conversation, generate_all, generate_batch, image_config_for
from mllm_jax.infer.chat_template import (copy_chat_template, read_chat_template,
                                          write_chat_template)
from mllm_jax.infer.prompting import Session
from mllm_jax.infer.sampling import sample_logits, warp_logits

__all__ = ["Conversation", "generate_batch", "generate_all", "image_config_for", "Session",
           "write_chat_template", "read_chat_template", "copy_chat_template", "warp_logits",
           "sample_logits"]
