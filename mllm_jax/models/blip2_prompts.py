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


# Instruction tokens per sample in training batches: LAVIS's InstructBLIP cuts the Q-Former's
# text input to max_txt_len = 128 tokens.
INSTRUCTION_LENGTH = 128


def user_messages(messages) -> list:
    """The user's messages of a LLaVA-format conversation (roles "human" / "user")."""
    return [m for m in messages if m.get("from") in ("human", "user")]


class InstructionInputs:
    """InstructBLIP's per-sample training inputs (`ModelFamily.sample_inputs`): the sample's
    instruction, its user messages as one text (`prompt_text`), in the Q-Former's tokenizer
    with its special tokens ([CLS] ... [SEP]) and cut to `max_length` tokens, the last one
    kept (HF's truncation keeps [SEP]). Batches hold `qformer_input_ids` and
    `qformer_attention_mask` [batch, max_length], right padded. `tokenizer` None builds
    synthetic inputs only."""

    keys = ("qformer_input_ids", "qformer_attention_mask")

    def __init__(self, tokenizer, max_length: int, vocab_size: int):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.vocab_size = int(vocab_size)
        pad = tokenizer.pad_id if tokenizer is not None else None
        self.pad_id = int(pad or 0)

    def encode(self, messages, sample_id) -> np.ndarray:
        text = prompt_text(user_messages(messages))
        ids = self.tokenizer.encode_with_special_tokens(text)
        if len(ids) > self.max_length:
            ids = ids[:self.max_length - 1] + ids[-1:]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"sample {sample_id!r}: the Q-Former tokenizer gave id {bad[0]}, "
                             f"outside the Q-Former's vocab_size {self.vocab_size}: "
                             "data.qformer_tokenizer must be the checkpoint's qformer_tokenizer/")
        return np.asarray(ids, np.int32)

    def collate(self, encoded, batch_size: int) -> dict:
        ids = np.full((batch_size, self.max_length), self.pad_id, np.int32)
        mask = np.zeros((batch_size, self.max_length), np.int32)
        for row, e in enumerate(encoded):
            ids[row, :len(e)], mask[row, :len(e)] = e, 1
        return {"qformer_input_ids": ids, "qformer_attention_mask": mask}

    def synthetic(self, rng, batch_size: int) -> dict:
        """Random instructions of 2 to max_length tokens."""
        lengths = rng.integers(2, self.max_length + 1, size=batch_size)
        mask = (np.arange(self.max_length)[None] < lengths[:, None]).astype(np.int32)
        ids = rng.integers(1, self.vocab_size, size=(batch_size, self.max_length))
        return {"qformer_input_ids": np.where(mask, ids, self.pad_id).astype(np.int32),
                "qformer_attention_mask": mask}


def instruction_inputs(cfg, data_cfg, *, llm_tokenizer_fallback: bool = False):
    """The `InstructionInputs` of an InstructBLIP config (None for BLIP-2): the Q-Former's
    tokenizer from `data.qformer_tokenizer`, default `data.tokenizer`/qformer_tokenizer (where
    `InstructBlipProcessor.save_pretrained` puts it; with `llm_tokenizer_fallback`, the LLM's
    tokenizer `data.tokenizer` itself when that directory does not exist);
    `data.qformer_max_length` tokens per instruction (default 128, as LAVIS, or the
    Q-Former's max_position_embeddings if fewer). Synthetic data needs no tokenizer."""
    q = cfg.projector
    if q.model_type != "instructblip_qformer":
        return None
    limit = int(q.max_position_embeddings)
    length = data_cfg.get("qformer_max_length") or min(INSTRUCTION_LENGTH, limit)
    if not 2 <= length <= limit:
        raise ValueError(f"data.qformer_max_length = {length}: the Q-Former reads 2 to "
                         f"max_position_embeddings = {limit} instruction tokens")
    if data_cfg.get("source") == "synthetic":
        return InstructionInputs(None, length, q.vocab_size)
    path = data_cfg.get("qformer_tokenizer") or ""
    if not path and data_cfg.get("tokenizer"):
        path = os.path.join(data_cfg.get("tokenizer"), QFORMER_TOKENIZER_DIR)
        if llm_tokenizer_fallback and not os.path.isdir(path):
            path = data_cfg.get("tokenizer")
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"InstructBLIP's Q-Former reads each sample's instruction with its own tokenizer, "
            f"and {path or 'data.tokenizer'!r} is not a directory: set "
            f"data.qformer_tokenizer to the checkpoint's {QFORMER_TOKENIZER_DIR}/ directory")
    return InstructionInputs(load_tokenizer(path), length, q.vocab_size)
