"""The same training step in PyTorch/transformers, for side-by-side numbers.

The model is transformers' own LlavaForConditionalGeneration (or *ForCausalLM) built from
our config through `hf_config.to_hf`, random-initialized, float32, eager attention as
transformers defaults to on CPU; AdamW on the same trainable parameters.
"""
import re
import time

import numpy as np


def build(cfg, trainable_patterns, lr=1e-4, threads=None):
    import torch
    import transformers

    from mllm_jax.convert import hf_config, hf_keys
    if threads:
        torch.set_num_threads(threads)
    hf = hf_config.to_hf(cfg)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items()
                                                  if k != "architectures"})
    model = getattr(transformers, hf["architectures"][0])(config)
    model.train()
    # Our paths ('language_model/model/layers_0/...') vs torch names: the family's key
    # aliases give the published names, whose top-level components the stage patterns select.
    params = []
    for name, p in model.named_parameters():
        ours = hf_keys.canonical_key(name, cfg.model_type).replace(".", "/")
        p.requires_grad_(any(re.search(pat, ours) for pat in trainable_patterns))
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return model, opt


def time_steps(model, opt, batch: dict, steps: int, warmup: int = 1) -> float:
    """Seconds of each timed step (forward with labels, backward, AdamW, zero_grad)."""
    import torch
    inputs = {"input_ids": torch.from_numpy(np.asarray(batch["input_ids"], np.int64)),
              "attention_mask": torch.from_numpy(np.asarray(batch["attention_mask"], np.int64)),
              "labels": torch.from_numpy(np.asarray(batch["labels"], np.int64))}
    if "pixel_values" in batch:
        pix = np.asarray(batch["pixel_values"], np.float32)
        pix = pix.reshape(-1, *pix.shape[2:]).transpose(0, 3, 1, 2)  # NHWC -> NCHW
        inputs["pixel_values"] = torch.from_numpy(np.ascontiguousarray(pix))

    def one():
        out = model(**inputs)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    for _ in range(warmup):
        one()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    return times
