"""Deterministic synthetic batches for the training engine (benchmarks, tests, debugging).

Batch k is a pure function of (seed, k), generated for the whole global batch and sliced
per process, so any number of processes sees the same global batches. The iterator state is
the index of the next batch: saving and restoring it resumes exactly. `distinct_batches=n`
cycles through n batches (a model must be able to overfit them: a sanity check).
"""
import numpy as np

from mllm_jax.models import registry
from mllm_jax.train.losses import IGNORE_INDEX


class SyntheticSource:
    def __init__(self, model_cfg, global_batch_size: int, text_len: int, *, seed: int = 0,
                 images_per_sample: int = 1, objective: str = "lm", nan_batches=(),
                 distinct_batches: int = 0, process_index: int = 0, process_count: int = 1):
        if global_batch_size % process_count:
            raise ValueError(f"global batch {global_batch_size} does not split over "
                             f"{process_count} processes")
        self.cfg = model_cfg
        self.global_batch_size = global_batch_size
        self.text_len = text_len
        self.seed = seed
        self.images = images_per_sample if registry.is_multimodal(model_cfg) else 0
        self.objective = objective
        self.nan_batches = set(int(i) for i in nan_batches)  # by batch index, not content
        self.distinct_batches = int(distinct_batches or 0)
        if self.nan_batches and not self.images:
            raise ValueError("nan_batches needs image inputs (a model that takes images) to "
                             "inject NaNs")
        self.local = slice(process_index * global_batch_size // process_count,
                           (process_index + 1) * global_batch_size // process_count)
        # The model's per-sample inputs (InstructBLIP's instruction), drawn after the rest.
        self.inputs = (registry.sample_inputs(model_cfg, {"source": "synthetic"})
                       if objective == "lm" and self.images else None)
        self.next_index = 0

    # grain-style iterator state
    def get_state(self) -> dict:
        return {"next_index": self.next_index, "seed": self.seed}

    def set_state(self, state: dict):
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run uses "
                             f"{self.seed}")
        self.next_index = int(state["next_index"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.global_batch(self.next_index)
        self.next_index += 1
        return {k: v[self.local] for k, v in batch.items()}

    @property
    def seq_len(self) -> int:
        if self.objective == "image_text":
            return self.text_len
        return 1 + self.images * self._image_tokens() + self.text_len

    def _image_tokens(self) -> int:
        return registry.tokens_per_image(self.cfg) if self.images else 0

    def _sequence(self, rng, b):
        """Token ids, attention mask and labels for b samples: BOS, image tokens, a prompt,
        then an answer (the only part with loss), then padding."""
        t = self.cfg.text
        image_index = registry.image_token_id(self.cfg) if self.images else -1
        s = self.seq_len
        ids = rng.integers(3, t.vocab_size - 1, size=(b, s))
        ids[ids == image_index] = 3
        ids[:, 0] = t.bos_token_id
        n_img = self.images * self._image_tokens()
        ids[:, 1:1 + n_img] = image_index
        lengths = rng.integers(self.text_len // 2, self.text_len + 1, size=b)
        prompt = rng.integers(1, np.maximum(lengths // 2, 2))
        pos = np.arange(s)[None, :]
        text_pos = pos - 1 - n_img
        mask = text_pos < lengths[:, None]
        pad = t.pad_token_id if t.pad_token_id is not None else 0
        ids = np.where(mask, ids, pad)
        labels = np.where(mask & (text_pos >= prompt[:, None]), ids, IGNORE_INDEX)
        return ids.astype(np.int32), mask.astype(np.int32), labels.astype(np.int32)

    def _pairs(self, rng, b, index, content) -> dict:
        """Image-caption pairs (data mode image_text): one image per sample, a caption of
        random tokens below `cfg.qformer.vocab_size - 1` (the last id is kept for the
        decoder token) of random length, distinct image ids."""
        v = self.cfg.vision
        vocab = self.cfg.qformer.vocab_size - 1
        ids = rng.integers(1, vocab, size=(b, self.text_len))
        lengths = rng.integers(max(2, self.text_len // 2), self.text_len + 1, size=b)
        mask = np.arange(self.text_len)[None, :] < lengths[:, None]
        pix = rng.standard_normal((b, v.image_size, v.image_size, v.num_channels),
                                  dtype=np.float32)
        if index in self.nan_batches:
            pix[:] = np.nan
        return {"pixel_values": pix, "input_ids": np.where(mask, ids, 0).astype(np.int32),
                "attention_mask": mask.astype(np.int32),
                "image_ids": (content * b + np.arange(b)).astype(np.int32)}

    def global_batch(self, index: int) -> dict:
        content = index % self.distinct_batches if self.distinct_batches else index
        rng = np.random.default_rng([self.seed, content])
        b = self.global_batch_size
        out = {}
        if self.objective == "image_text":
            return self._pairs(rng, b, index, content)
        if self.objective == "dpo":
            for side in ("chosen", "rejected"):
                ids, mask, labels = self._sequence(rng, b)
                out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask,
                            f"{side}_labels": labels})
        else:
            out["input_ids"], out["attention_mask"], out["labels"] = self._sequence(rng, b)
        if self.images:
            v = self.cfg.vision
            pix = rng.standard_normal((b, self.images, v.image_size, v.image_size,
                                       v.num_channels), dtype=np.float32)
            if index in self.nan_batches:
                pix[:] = np.nan
            out["pixel_values"] = pix
        if self.inputs is not None:
            out.update(self.inputs.synthetic(rng, b))
        return out
