"""Suite-wide settings, read before any test module imports jax.

Ctrl-C reaches the tests however the suite was started (see the SIGINT lines below).

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
import signal
import tempfile

# A shell without job control starts background commands with SIGINT ignored, and an
# ignored signal stays ignored in every child: the Ctrl-C tests (tests/test_train.py,
# tests/test_interrupt.py) would see no Ctrl-C at all. Python's own handler here makes
# the children start with the default disposition, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="fibseg_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
