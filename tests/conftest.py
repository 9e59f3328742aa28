"""Suite-wide settings, read before any test module imports jax.

One persistent XLA compilation cache for the whole session, inherited by the scripts the
tests run as subprocesses: many tests train or segment the same tiny models, each in a
fresh process or behind a fresh `jax.jit`, and compile the same programs again. Every
program is cached, however quick its compilation (the thresholds are 0). A cache set by
the caller (`JAX_COMPILATION_CACHE_DIR`) is kept. Measured: tests/test_train.py and
tests/test_infer.py 180 s -> 146 s (BUILD_NOTES.md, "The suite's time").
"""

import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="fibseg_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
