"""The machine's measured matmul peak, the denominator of MFU on hosts without a spec sheet.

Both XLA's and PyTorch's float32 GEMMs are timed (PyTorch when installed); the peak is the
faster of the two, so MFU is never flattered by a slow matmul kernel.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np


def _best(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> dict:
    """FLOP/s of an n x n x n matmul: {'xla': ..., 'torch': ... or None, 'peak': max}."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    xla = 2 * n ** 3 / _best(lambda: f(a, b).block_until_ready(), repeats)
    out = {"xla": xla, "torch": None}
    try:
        import torch
        ta = torch.from_numpy(np.array(a, np.float32))
        tb = torch.from_numpy(np.array(b, np.float32))
        ta @ tb
        out["torch"] = 2 * n ** 3 / _best(lambda: ta @ tb, repeats)
    except ImportError:
        pass
    out["peak"] = max(v for v in (out["xla"], out["torch"]) if v)
    return out
