import atexit
import os
import shutil
import tempfile

from compile_flags import xla_flags

# Must happen before jax is imported anywhere: tests shard over a simulated 8-device mesh,
# and their programs are built for compile speed (compile_flags.py).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests that compile for a TPU topology (libtpu installed, no TPU) may run in both xdist
# workers at once; libtpu otherwise admits one process per machine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Many tests build the same tiny trainers and XLA compilation dominates their run time: this
# process keeps what it compiles in its own temporary cache (removed at exit), so an identical
# program (same HLO, devices and options) compiles once. Subprocesses do not inherit it.
_XLA_CACHE = tempfile.mkdtemp(prefix="mllm_jax_tests_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# The two xdist workers take whole files (`--dist loadfile --no-loadscope-reorder`: in the
# order collected). A few files hold most of the suite's time; sent first, they run while
# the other worker works through the many short files, instead of both workers waiting on
# them at the end.
LONGEST_FIRST = ("test_demo_qformer.py", "test_resume_multiprocess.py", "test_demo.py",
                 "test_notebook.py",
                 "test_registry.py", "test_resume.py", "test_blip2_stage1.py",
                 "test_instructblip_train.py", "test_train.py", "test_plan.py",
                 "test_splash_attention.py", "test_packing.py", "test_blip2_train.py",
                 "test_export_all.py", "test_siglip.py", "test_qwen2_vl.py",
                 "test_llava_repo_checkpoints.py", "test_llava_next.py",
                 "test_llava_next_train.py", "test_llava_next_serving.py",
                 "test_qwen2_vl_serving.py", "test_qwen2_vl_train.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
