"""Every test runs on 8 fake CPU devices, so sharded code paths are exercised on one host."""

import os
import shutil
import sys
import tempfile

# Compiling is most of the suite's time: without LLVM's expensive passes (and XLA's backend
# optimisation) compiles take ~40% less, and XLA:CPU's older elemental emitter instead of its MLIR
# fusion emitters another ~35% of the compile's CPU time (the tiny train step: 13 -> 8 CPU-s). The
# programs compute the same functions (an emitter's exp may differ in the last bits; every
# comparison here runs under these flags); the speed of code is measured in benchmarks/, never here.
# Child processes the tests start inherit this.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                           " --xla_cpu_use_fusion_emitters=false").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for this run, shared by the xdist workers and the processes
# the tests start (the demo's second run, resumed trainings): a program compiled twice in the run
# (same HLO, same devices and flags) is read back instead. The process that creates it (pytest's
# controller, before it starts the workers, who inherit the variable) removes it when the run ends.
_OWNS_CACHE = "MIRASOL3B_TESTS_JAX_CACHE" not in os.environ
if _OWNS_CACHE:
    os.environ["MIRASOL3B_TESTS_JAX_CACHE"] = tempfile.mkdtemp(prefix="mirasol3b-tests-jax-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["MIRASOL3B_TESTS_JAX_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402


import orbax.checkpoint as ocp  # noqa: E402

# Orbax's replica-parallel saving (its default, right on pods where replicas share the writing)
# compiles one slicing program per array shape: ~240 compiles on the tiny model, the largest fixed
# cost of the checkpoint tests on CPU. The files written are the same either way.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def pytest_unconfigure(config):
    if _OWNS_CACHE:
        shutil.rmtree(os.environ["MIRASOL3B_TESTS_JAX_CACHE"], ignore_errors=True)


# The slowest files, slowest first (178, 165, 101, 96, 91, 89 and 85 s of test time on a 2-core
# AMD EPYC), start first so the two xdist workers finish together (Makefile: `--dist loadfile
# --no-loadscope-reorder` keeps this order). In xdist's own order (files with the most tests
# first) one worker's test time was 587 s, the other's 384 s. Order changes time, never results.
SLOW_FIRST = ("test_train_loop.py", "test_model.py", "test_demo.py", "test_multihost.py", "test_checkpoints.py",
              "test_decoding.py", "test_streaming.py", "test_summary.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))
