"""Benchmarks behind `mllm-jax bench`: each prints one JSON line."""
