import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere: tests shard over a simulated 8-device mesh.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Many tests build the same tiny trainers and XLA compilation dominates their run time: this
# process keeps what it compiles in its own temporary cache (removed at exit), so an identical
# program (same HLO, devices and options) compiles once. Subprocesses do not inherit it.
_XLA_CACHE = tempfile.mkdtemp(prefix="mllm_jax_tests_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
