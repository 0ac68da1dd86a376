"""XLA flags for the test processes (conftest.py) and the processes they start.

The tests' programs are tiny and compile-bound: XLA's CPU backend spends most of their
compile time in LLVM's optimiser and in its fusion emitters. Built without the optimiser
and with the older elemental emitters, the suite's programs compile in about half the time
(tests/test_generate.py: 43 s of backend compilation against 19 s). The float semantics are
the same IEEE ones either way (no reassociation, no fast math); the parity tests' tolerances
hold on both paths.
"""
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test process with `devices` simulated CPU devices (None: one)."""
    count = f"--xla_force_host_platform_device_count={devices} " if devices else ""
    return count + FAST_COMPILE
