"""`mllm-jax bench decode`: greedy generation speed of a preset with `infer.generate`, next to
transformers' `LlavaForConditionalGeneration.generate` on the same random weights, same
prompts (image tokens + text) and same machine in the same run.

Prints one JSON line: per batch size, the median wall time of the whole generate call for
N new tokens (`total_s`), of a call with one new token (`prefill_s`: vision tower, prompt
prefill and the first token), decode tokens/s = batch * (N - 1) / (total - prefill),
end-to-end tokens/s = batch * N / total, ms per decode step, the JAX compile time (first
call minus a steady call), the speedups over PyTorch, and whether both produced the same
tokens (else the first differing [sample, position]). The timed calls alternate (JAX N
tokens, JAX one token, PyTorch N, PyTorch one, again); the decode figures are null when the
N-token call was not the slower one (a model so small that decoding is lost in the timing
noise). The 1-minute load average at start and end says how busy the machine was.
"""
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from mllm_jax.models import registry

DTYPES = ("float32", "bfloat16")


def add_arguments(parser):
    parser.add_argument("--preset", default="llava-bench-small")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8],
                        help="batch sizes, one measurement each")
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="tokens generated per sample (at least 2)")
    parser.add_argument("--prompt-text-len", type=int, default=32,
                        help="text tokens per prompt (BOS included) besides the image tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="PyTorch intra-op threads (default: the cores this process may "
                             "use); on a busy machine 1 thread can be far faster than 2")


def main(args) -> int:
    import json
    out = run(args.preset, tuple(args.batch), args.new_tokens, args.prompt_text_len,
              args.repeats, args.dtype, torch_compare=not args.no_torch,
              torch_threads=args.torch_threads)
    print(json.dumps(out))
    return 0


# ---- model and prompts -----------------------------------------------------------------------

def build(preset: str, dtype: str = "float32", seed: int = 0):
    """The preset (a model that takes images) with random (seeded) parameters in `dtype`."""
    import flax.linen as nn

    from mllm_jax import build_model, presets
    cfg = presets.get(preset)
    if not (registry.is_multimodal(cfg) and registry.generates(cfg)):
        raise ValueError(f"bench decode needs a preset that generates from images; {preset!r} "
                         f"is {cfg.model_type!r}")
    cfg.dtype = cfg.param_dtype = dtype
    model = build_model(cfg)
    inputs = registry.init_inputs(cfg)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, *inputs)["params"]))(
        jax.random.PRNGKey(seed))
    return model, params


def prompts(cfg, batch: int, text_len: int, seed: int = 0):
    """input_ids [batch, text_len + image tokens] (BOS, text, the image's tokens, text; no
    padding) and NHWC pixel values [batch, size, size, channels], one image per prompt."""
    if text_len < 2:
        raise ValueError(f"--prompt-text-len must be >= 2 (BOS and one text token), got "
                         f"{text_len}")
    rs = np.random.RandomState(seed)
    t = cfg.text
    image_id = registry.image_token_id(cfg)
    special = {t.bos_token_id, t.eos_token_id, t.get("pad_token_id"), image_id}
    allowed = np.array([i for i in range(3, t.vocab_size) if i not in special])
    before = (text_len - 1) // 2
    rows = []
    for _ in range(batch):
        text = rs.choice(allowed, text_len - 1)
        rows.append(np.concatenate([[t.bos_token_id], text[:before],
                                    np.full(registry.tokens_per_image(cfg), image_id),
                                    text[before:]]))
    v = cfg.vision
    pixels = rs.standard_normal((batch, v.image_size, v.image_size, v.num_channels))
    return np.stack(rows).astype(np.int32), pixels.astype(np.float32)


def torch_model(model, params, dtype: str = "float32"):
    """The transformers class named by the exported config's `architectures` (for LLaVA
    `LlavaForConditionalGeneration`) holding `params` (written by `save_hf`)."""
    import torch
    import transformers

    from mllm_jax import save_hf
    from mllm_jax.convert import hf_config
    cls = getattr(transformers, hf_config.to_hf(model.cfg)["architectures"][0])
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, params, tmp)
        ref = cls.from_pretrained(tmp, dtype=getattr(torch, dtype))
    return ref.eval()


# ---- timing ------------------------------------------------------------------------------------

def jax_caller(model, params, ids, pixels):
    """call(n) -> the [batch, n] tokens `infer.generate` produces greedily."""
    from mllm_jax.infer.generate import generate

    def call(n):
        return generate(model, params, ids, pixel_values=pixels, max_new_tokens=n,
                        eos_token_id=None)
    return call


def torch_caller(ref, ids, pixels):
    """call(n) -> the [batch, n] new tokens of transformers' greedy `generate`."""
    import torch
    inputs = {"input_ids": torch.from_numpy(ids.astype(np.int64)),
              "attention_mask": torch.ones(ids.shape, dtype=torch.int64),
              "pixel_values": torch.from_numpy(
                  np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).to(ref.dtype)}

    def call(n):
        # No EOS: every call produces exactly n tokens, as the JAX side (eos_token_id=None).
        with torch.inference_mode():
            out = ref.generate(**inputs, generation_config=_generation_config(n))
        tokens = out[:, ids.shape[1]:].numpy()
        if tokens.shape[1] != n:
            raise RuntimeError(f"transformers generated {tokens.shape[1]} tokens, expected {n}")
        return tokens
    return call


def measure(callers: dict, new_tokens: int, repeats: int) -> dict:
    """For each name -> call(n): the first call's seconds (compilation included), then the
    median seconds of `repeats` calls with n = new_tokens (total_s) and n = 1 (prefill_s),
    and the tokens. After one warm-up of each program, the timed calls go round all callers
    in turn, so that changes in the machine's load during the run fall on all alike."""
    out = {}
    for name, call in callers.items():
        t = time.perf_counter()
        call(new_tokens)
        out[name] = {"first_call_s": time.perf_counter() - t, "total": [], "prefill": []}
        call(1)
    for _ in range(repeats):
        for name, call in callers.items():
            t = time.perf_counter()
            out[name]["tokens"] = call(new_tokens)
            t1 = time.perf_counter()
            call(1)
            out[name]["total"].append(t1 - t)
            out[name]["prefill"].append(time.perf_counter() - t1)
    for m in out.values():
        m["total_s"] = statistics.median(m.pop("total"))
        m["prefill_s"] = statistics.median(m.pop("prefill"))
    return out


def _generation_config(n):
    import transformers
    return transformers.GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                         use_cache=True, eos_token_id=None, pad_token_id=0)


def first_difference(a, b):
    """None when the token arrays are equal, else [sample, position] of the first
    difference (position = the shorter length when one is a prefix of the other)."""
    if a.shape == b.shape and np.array_equal(a, b):
        return None
    for i in range(min(len(a), len(b))):
        n = min(len(a[i]), len(b[i]))
        diff = np.flatnonzero(a[i, :n] != b[i, :n])
        if diff.size or len(a[i]) != len(b[i]):
            return [i, int(diff[0]) if diff.size else n]
    return [min(len(a), len(b)), 0]


def _figures(prefix, t, batch, n):
    decode = t["total_s"] - t["prefill_s"]
    # Decoding shorter than the timing noise (tiny models) leaves no measurable difference.
    measurable = decode > 0
    return {f"{prefix}total_s": round(t["total_s"], 4),
            f"{prefix}prefill_s": round(t["prefill_s"], 4),
            f"{prefix}step_ms": round(1000 * decode / (n - 1), 3) if measurable else None,
            f"{prefix}decode_tokens_per_s": round(batch * (n - 1) / decode, 1) if measurable
            else None,
            f"{prefix}e2e_tokens_per_s": round(batch * n / t["total_s"], 1)}


def run(preset="llava-bench-small", batches=(1, 8), new_tokens=64, prompt_text_len=32,
        repeats=3, dtype="float32", torch_compare=True, seed=0, torch_threads=None) -> dict:
    if new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2 to time decoding, got {new_tokens}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    threads = len(os.sched_getaffinity(0))
    model, params = build(preset, dtype, seed)
    out = {"preset": preset, "dtype": dtype, "batches": list(batches),
           "new_tokens": new_tokens, "prompt_text_len": prompt_text_len,
           "image_tokens": registry.tokens_per_image(model.cfg), "repeats": repeats,
           "threads": threads, "jax_version": jax.__version__,
           "jax_backend": jax.default_backend(),
           "load_avg_1m_start": round(os.getloadavg()[0], 2)}
    ref = None
    if torch_compare:
        import torch
        import transformers
        torch.set_num_threads(torch_threads or threads)
        ref = torch_model(model, params, dtype)
        out.update(torch_version=torch.__version__, transformers_version=transformers.__version__,
                   torch_threads=torch.get_num_threads(),
                   torch_attn_implementation=ref.config._attn_implementation)
    results = []
    for b in batches:
        ids, pixels = prompts(model.cfg, b, prompt_text_len, seed=seed + b)
        callers = {"jax": jax_caller(model, params, ids, pixels)}
        if ref is not None:
            callers["torch"] = torch_caller(ref, ids, pixels)
        m = measure(callers, new_tokens, repeats)
        j = m["jax"]
        r = {"batch": b, "prompt_len": int(ids.shape[1]),
             "jax_compile_s": round(max(j["first_call_s"] - j["total_s"], 0.0), 2),
             "jax_first_call_s": round(j["first_call_s"], 2)}
        r.update(_figures("jax_", j, b, new_tokens))
        if ref is not None:
            t = m["torch"]
            r.update(_figures("torch_", t, b, new_tokens))
            diff = first_difference(j["tokens"], t["tokens"])
            r.update(e2e_speedup_vs_torch=round(t["total_s"] / j["total_s"], 3),
                     decode_speedup_vs_torch=_ratio(r["jax_decode_tokens_per_s"],
                                                    r["torch_decode_tokens_per_s"]),
                     prefill_speedup_vs_torch=round(t["prefill_s"] / j["prefill_s"], 3),
                     tokens_equal=diff is None, first_difference=diff)
        results.append(r)
    out["results"] = results
    # The machine's load (runnable processes, 1-minute mean) beside `threads`: timings taken
    # while other work competes for the cores are slower and noisier.
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    return out


def _ratio(a, b):
    return round(a / b, 3) if a and b else None
