"""How BLIP-2 and InstructBLIP take a prompt: as HF's `Blip2Processor` /
`InstructBlipProcessor` build the inputs, not through a conversation template.

`input_ids` are `num_query_tokens` image tokens for the image, then the text as the LLM's
tokenizer encodes it with its own special tokens (BOS before the text for OPT and LLaMA, EOS
after it for T5). InstructBLIP's Q-Former reads the same text through its own BERT
tokenizer, which HF saves in the `qformer_tokenizer/` subdirectory of the checkpoint:
`qformer_input_ids` ([CLS] text [SEP]) and `qformer_attention_mask`, right padded as BERT
pads. BLIP-2 has no chat format: the text is the conversation's messages, image placeholders
removed, joined by spaces (one question: the question itself, e.g. BLIP-2's VQA prompt
"Question: {} Short answer:").
"""
import os

import numpy as np

from mllm_jax.data.templates import IMAGE_PLACEHOLDER
from mllm_jax.data.tokenizer import load_tokenizer

QFORMER_TOKENIZER_DIR = "qformer_tokenizer"


def prompt_text(messages) -> str:
    """The conversation as one text: the messages without image placeholders, joined by a
    space."""
    parts = [m["value"].replace(IMAGE_PLACEHOLDER, "").strip() for m in messages]
    return " ".join(p for p in parts if p)


class Blip2PromptEncoder:
    """`encode(conversation) -> (input ids, Q-Former ids or None)`; `batch(extras)` -> the
    padded `qformer_input_ids` / `qformer_attention_mask` of a batch (InstructBLIP);
    `render(conversation)`: the prompt's text, for records."""

    def __init__(self, cfg, checkpoint_dir):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(checkpoint_dir)
        self.qformer_tokenizer = None
        if cfg.projector.model_type == "instructblip_qformer":
            sub = os.path.join(checkpoint_dir, QFORMER_TOKENIZER_DIR)
            if not os.path.isdir(sub):
                raise FileNotFoundError(
                    f"{checkpoint_dir} has no {QFORMER_TOKENIZER_DIR}/ directory: InstructBLIP's "
                    "Q-Former reads the instruction with its own tokenizer, which "
                    "InstructBlipProcessor.save_pretrained writes there; save the processor "
                    "into the checkpoint directory")
            self.qformer_tokenizer = load_tokenizer(sub)

    def render(self, conversation) -> str:
        """The prompt as text: an image placeholder per image, then the text."""
        return IMAGE_PLACEHOLDER * len(conversation.images) + prompt_text(conversation.messages)

    def encode(self, conversation):
        n = len(conversation.images)
        if n > 1:
            raise ValueError(f"sample {conversation.sample_id!r}: BLIP-2 / InstructBLIP take "
                             f"one image per prompt, got {n}")
        text = prompt_text(conversation.messages)
        ids = [self.cfg.image_token_index] * (self.cfg.projector.num_query_tokens * n)
        ids += self.tokenizer.encode_with_special_tokens(text)
        extra = None
        if self.qformer_tokenizer is not None and n:
            extra = self.qformer_tokenizer.encode_with_special_tokens(text)
            limit = self.cfg.projector.max_position_embeddings
            if len(extra) > limit:
                raise ValueError(f"sample {conversation.sample_id!r}: the instruction is "
                                 f"{len(extra)} Q-Former tokens, more than its "
                                 f"max_position_embeddings = {limit}; shorten it")
        return np.asarray(ids, np.int32), extra

    def batch(self, extras) -> dict:
        """The extra model inputs of a batch of encoded prompts, row for row."""
        if self.qformer_tokenizer is None or all(e is None for e in extras):
            return {}
        if any(e is None for e in extras):
            raise ValueError("InstructBLIP decodes prompts with and without an image in "
                             "separate batches: every prompt of a batch needs its image")
        pad = self.qformer_tokenizer.pad_id or 0
        width = max(len(e) for e in extras)
        ids = np.full((len(extras), width), pad, np.int32)
        mask = np.zeros((len(extras), width), np.int32)
        for row, e in enumerate(extras):
            ids[row, :len(e)], mask[row, :len(e)] = e, 1
        return {"qformer_input_ids": ids, "qformer_attention_mask": mask}
