"""XLA compiler options of the library's jitted steps (training, validation, segmentation).

On XLA:CPU, jaxlib 0.10 hands convolutions and dots to YNNPACK fusions by default. For
the U-Net and Sensor-3D, XLA's own (Eigen) convolutions are faster on the CPUs we measured:
the U-Net training step 1.36x, Sensor-3D's 1.35x, the U-Net forward pass 1.17x (AMD EPYC,
AVX2, 2 cores; BUILD_NOTES.md). The maths is the same float32 convolution; only the
summation order differs (logits within ~1e-5).

The options go to `jax.jit(..., compiler_options=...)` of the library's own functions, so
they change nothing else in a user's process, and an option the user sets in `XLA_FLAGS`
wins over ours. Off CPU there are none.
"""

from __future__ import annotations

import os
from typing import Any

import jax

# An empty list of YNNPACK fusion types: XLA:CPU compiles convolutions and dots itself.
CPU_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(backend: str | None = None) -> dict[str, Any]:
  """Options for `jax.jit(..., compiler_options=...)` of a step running on `backend`.

  Args:
    backend: "cpu", "gpu", "tpu"; default `jax.default_backend()`.

  Returns:
    `CPU_OPTIONS` on CPU, less any option named in the `XLA_FLAGS` environment variable;
    {} elsewhere.
  """
  if (backend or jax.default_backend()) != "cpu":
    return {}
  user_flags = os.environ.get("XLA_FLAGS", "")
  return {k: v for k, v in CPU_OPTIONS.items() if f"--{k}" not in user_flags}
