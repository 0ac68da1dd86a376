"""`mllm-jax bench decode` (`mllm_jax.bench.decode`): on tiny-llava it times JAX and
transformers generation for each batch size, reports every figure, and both produce the
same greedy tokens."""
import argparse
import json

import numpy as np
import pytest

from mllm_jax.bench import decode

PER_BATCH = ["batch", "prompt_len", "jax_compile_s", "jax_first_call_s", "jax_total_s",
             "jax_prefill_s", "jax_step_ms", "jax_decode_tokens_per_s", "jax_e2e_tokens_per_s",
             "torch_total_s", "torch_prefill_s", "torch_step_ms", "torch_decode_tokens_per_s",
             "torch_e2e_tokens_per_s", "e2e_speedup_vs_torch", "decode_speedup_vs_torch",
             "prefill_speedup_vs_torch", "tokens_equal", "first_difference"]
MEASURED = ["jax_first_call_s", "jax_total_s", "jax_prefill_s", "jax_e2e_tokens_per_s",
            "torch_total_s", "torch_prefill_s", "torch_e2e_tokens_per_s",
            "e2e_speedup_vs_torch", "prefill_speedup_vs_torch"]


def check_derived(r, side, batch, n):
    """Decode figures follow from the two wall times (rounded to 0.1 ms in the JSON); null
    only when decoding was not measurable (the n-token call not slower than the one-token
    call: tiny models, noise)."""
    total, prefill = r[side + "total_s"], r[side + "prefill_s"]
    # total_s is rounded to 0.1 ms: on a tiny model that alone moves the ratio by ~1%.
    assert r[side + "e2e_tokens_per_s"] == pytest.approx(batch * n / total,
                                                         rel=0.01 + 0.5e-4 / total)
    if r[side + "step_ms"] is None:
        assert r[side + "decode_tokens_per_s"] is None
        assert total - prefill <= 1e-4
        return
    decode_s = r[side + "step_ms"] * (n - 1) / 1000
    assert decode_s > 0
    assert decode_s == pytest.approx(total - prefill, abs=2e-4)
    assert r[side + "decode_tokens_per_s"] == pytest.approx(
        batch * (n - 1) / decode_s, rel=0.01 + 0.5e-3 / r[side + "step_ms"])


def test_tiny_llava_figures_and_equal_tokens(capsys):
    parser = argparse.ArgumentParser()
    decode.add_arguments(parser)
    args = parser.parse_args(["--preset", "tiny-llava", "--batch", "1", "2", "--new-tokens",
                              "4", "--prompt-text-len", "8", "--repeats", "1"])
    assert decode.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["preset"] == "tiny-llava" and out["dtype"] == "float32"
    assert out["batches"] == [1, 2] and out["new_tokens"] == 4 and out["threads"] >= 1
    assert out["torch_threads"] == out["threads"]
    assert out["load_avg_1m_start"] >= 0 and out["load_avg_1m_end"] >= 0
    for key in ("jax_version", "torch_version", "transformers_version"):
        assert out[key]
    assert [r["batch"] for r in out["results"]] == [1, 2]
    for r in out["results"]:
        assert set(PER_BATCH) <= set(r), set(PER_BATCH) - set(r)
        # BOS + 7 text tokens + 16 image tokens (28 px / 7 px patches, squared).
        assert r["prompt_len"] == 8 + 16
        for key in MEASURED:
            assert r[key] > 0, (key, r[key])
        assert r["jax_compile_s"] >= 0
        for side in ("jax_", "torch_"):
            check_derived(r, side, batch=r["batch"], n=4)
        # Both wall times are rounded to 0.1 ms in the JSON; the ratio inherits both errors.
        rounding = 0.5e-4 / r["torch_total_s"] + 0.5e-4 / r["jax_total_s"]
        assert r["e2e_speedup_vs_torch"] == pytest.approx(
            r["torch_total_s"] / r["jax_total_s"], rel=0.01 + rounding)
        assert r["tokens_equal"] is True and r["first_difference"] is None


def test_first_difference_names_sample_and_position():
    a = np.array([[5, 6, 7], [1, 2, 3]])
    assert decode.first_difference(a, a.copy()) is None
    b = a.copy()
    b[1, 2] = 9
    assert decode.first_difference(a, b) == [1, 2]
    assert decode.first_difference(a, a[:, :2]) == [0, 2]


def test_prompts_place_one_image_after_bos_and_text():
    from mllm_jax import presets
    cfg = presets.get("tiny-llava")
    ids, pixels = decode.prompts(cfg, 3, 8, seed=1)
    assert ids.shape == (3, 24) and pixels.shape == (3, 28, 28, 3)
    assert (ids[:, 0] == cfg.text.bos_token_id).all()
    assert ((ids == cfg.image_token_index).sum(1) == 16).all()
    text = ids[ids != cfg.image_token_index].reshape(3, 8)[:, 1:]
    assert not np.isin(text, [cfg.text.bos_token_id, cfg.text.eos_token_id]).any()
