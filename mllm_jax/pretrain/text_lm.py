"""Language-model pre-training of a small LLaMA on a text corpus (one document per line).

Lines are tokenized as BOS + text + EOS, concatenated, and cut into fixed-length sequences;
the loss is the masked next-token cross-entropy of `train.step.lm_objective`, optimised by
`train.optimizer.make_optimizer` (AdamW, warmup + cosine). The parameters are a CausalLM tree,
LLaVA's `language_model` subtree.

    res = pretrain_lm("shapes/text_corpus.txt", "shapes/tokenizer")
    llava_params["language_model"] = res.params
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mllm_jax import config as mc
from mllm_jax.models.llm import CausalLM
from mllm_jax.pretrain.contrastive import as_tokenizer, batch_order, init_params
from mllm_jax.train.optimizer import make_optimizer
from mllm_jax.train.optimizer import settings as optimizer_settings
from mllm_jax.train.step import init_state, lm_objective, make_train_step


def lm_model_config(tokenizer, hidden_size: int = 128, num_layers: int = 2,
                    num_heads: int = 4, max_position_embeddings: int = 512
                    ) -> ml_collections.ConfigDict:
    """A tiny LLaMA causal_lm config whose vocabulary and special ids are the tokenizer's."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by {num_heads} heads")
    text = mc.text_config(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size,
                          intermediate_size=int(8 * hidden_size / 3) // 8 * 8,
                          num_hidden_layers=num_layers, num_attention_heads=num_heads,
                          num_key_value_heads=num_heads, head_dim=hidden_size // num_heads,
                          max_position_embeddings=max_position_embeddings,
                          bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    text.pad_token_id = tokenizer.pad_id
    return mc.llm_config(text)


def read_lines(corpus) -> tuple[str, list]:
    """(source name, non-empty lines) of a corpus file path or a list of strings."""
    if isinstance(corpus, (str, os.PathLike)):
        path = os.fspath(corpus)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no text corpus at {path}; write one with "
                                    f"shapes.write_dataset")
        with open(path, encoding="utf-8") as f:
            return path, [line.strip() for line in f if line.strip()]
    return "corpus", [line.strip() for line in corpus if line.strip()]


def pack_lines(lines, tokenizer, seq_len: int, source: str = "corpus") -> np.ndarray:
    """int32 [n, seq_len]: BOS + line + EOS for every line, concatenated and cut into
    sequences (the incomplete tail is dropped)."""
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise ValueError(f"tokenizer {tokenizer.source} needs BOS and EOS tokens to pack lines")
    stream = []
    for line in lines:
        stream += [tokenizer.bos_id] + tokenizer.encode(line) + [tokenizer.eos_id]
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"{source}: {len(stream)} tokens do not fill one {seq_len}-token "
                         f"sequence; give more text or a smaller seq_len")
    return np.asarray(stream[:n * seq_len], np.int32).reshape(n, seq_len)


@dataclasses.dataclass
class LMResult:
    """`params`: the CausalLM tree (LLaVA's `language_model`); `config`: its causal_lm
    config; `metrics`: `losses` (one per step), `val_loss` (mean token NLL on the held-out
    sequences), `val_perplexity`, `train_tokens`, `val_tokens`, `seconds`."""
    params: Any
    config: ml_collections.ConfigDict
    metrics: dict


def pretrain_lm(corpus, tokenizer, *, val_corpus=None, val_fraction: float = 0.05,
                config=None, hidden_size: int = 128, num_layers: int = 2, seq_len: int = 128,
                steps: int = 200, batch_size: int = 16, lr: float = 3e-3,
                weight_decay: float = 0.01, warmup_ratio: float = 0.05, seed: int = 0,
                progress: Callable | None = None, log_every: int = 10) -> LMResult:
    """Trains a causal LM on `corpus` (a text file path or a list of lines); `tokenizer` is a
    Tokenizer or its directory. Held out: `val_corpus` when given, else the last
    `val_fraction` of the lines. `config` (a causal_lm config) defaults to
    `lm_model_config(tokenizer, hidden_size, num_layers)`. `progress` is called as
    progress(step, loss) every `log_every` steps and at the last one. Deterministic for a
    seed."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"need steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    tok = as_tokenizer(tokenizer)
    source, lines = read_lines(corpus)
    if not lines:
        raise ValueError(f"{source}: the corpus has no text lines")
    if val_corpus is not None:
        val_source, val_lines = read_lines(val_corpus)
        if not val_lines:
            raise ValueError(f"{val_source}: the held-out corpus has no text lines")
    else:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n_val = max(1, int(len(lines) * val_fraction))
        if n_val >= len(lines):
            raise ValueError(f"{source}: {len(lines)} line(s) leave none to train on after "
                             f"holding out {n_val}; give more text or a val_corpus")
        lines, val_lines, val_source = lines[:-n_val], lines[-n_val:], f"{source} (held out)"
    cfg = config if config is not None else lm_model_config(tok, hidden_size, num_layers)
    if cfg.text.vocab_size < tok.vocab_size:
        raise ValueError(f"model vocab_size {cfg.text.vocab_size} is smaller than the "
                         f"tokenizer's {tok.vocab_size}")
    start = time.perf_counter()
    train = pack_lines(lines, tok, seq_len, source)
    val = pack_lines(val_lines, tok, seq_len, val_source)
    batch_size = min(batch_size, len(train))
    order = batch_order(len(train), batch_size, steps, seed)

    model = CausalLM(cfg)
    params = init_params(model, seed, jnp.zeros((1, seq_len), jnp.int32))
    opt = dict(lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, grad_clip=1.0,
               b2=0.98)
    key = (cfg.to_json(), tuple(sorted(opt.items())), steps)
    if key not in _COMPILED:
        _COMPILED.clear()  # keeps one configuration's programs
        _COMPILED[key] = _programs(model, params, opt, steps)
    tx, train_step, nll = _COMPILED[key]
    data = jnp.asarray(train)
    state = init_state(params, tx, jax.random.PRNGKey(seed))
    losses = []
    for step in range(steps):
        state, m = train_step(state, data, order[step])
        losses.append(m["loss"])
        if progress is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
            progress(step + 1, float(m["loss"]))
    losses = [float(x) for x in jax.device_get(losses)]
    val_loss = evaluate_lm(functools.partial(nll, state.params), val, batch_size)
    metrics = {"losses": losses, "val_loss": val_loss, "val_perplexity": math.exp(val_loss),
               "train_tokens": int(train.size), "val_tokens": int(val.size), "steps": steps,
               "batch_size": batch_size, "seconds": time.perf_counter() - start}
    return LMResult(state.params, cfg, metrics)


_COMPILED = {}  # configuration -> (optimizer, train step, NLL), reused by later calls


def _programs(model, params, opt: dict, steps: int):
    """The optimizer, the jitted train step and the jitted (NLL sum, tokens) of a batch."""
    tx, _ = make_optimizer(optimizer_settings(**opt), params, steps)
    step_fn = make_train_step(model, lm_objective, tx)

    # The data are an argument, not a constant: XLA would otherwise fold them into the program.
    @jax.jit
    def train_step(state, data, idx):
        rows = data[idx]
        return step_fn(state, {}, None, {"input_ids": rows, "labels": rows})

    @jax.jit
    def nll(params, rows):
        total, n, _ = lm_objective(model, params, {"input_ids": rows, "labels": rows}, None)
        return total, n

    return tx, train_step, nll


def evaluate_lm(nll, sequences, batch_size: int = 16) -> float:
    """Mean next-token NLL (nats) over every position of the packed `sequences`; `nll(rows)`
    gives (NLL sum, token count) of a batch."""
    total, count = 0.0, 0
    for s in range(0, len(sequences), batch_size):
        a, b = nll(jnp.asarray(sequences[s:s + batch_size]))
        total, count = total + float(a), count + int(b)
    return total / count
