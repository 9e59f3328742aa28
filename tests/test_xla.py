"""The library's XLA compiler options: where they apply, and that the user's XLA_FLAGS win."""

import jax
import jax.numpy as jnp
import numpy as np

from fibseg_jax import models, xla
from fibseg_jax.infer import predict


def test_options_on_cpu_only(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert xla.compiler_options("cpu") == xla.CPU_OPTIONS
  assert xla.compiler_options("gpu") == {} and xla.compiler_options("tpu") == {}


def test_user_xla_flags_win(monkeypatch):
  name = next(iter(xla.CPU_OPTIONS))
  monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 --{name}=foo")
  assert xla.compiler_options("cpu") == {}


def test_segmentation_forward_is_compiled_with_them(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  model = models.build({"name": "unet", "num_classes": 3, "depth": 1, "features": (4, 4)})
  variables = model.init(jax.random.key(0), jnp.zeros((1, 1, 16, 16, 2)), train=False)
  predictor = predict.TilePredictor(
    model, variables, offset=[0, 0], scale=[1, 1], overlap=4, batch=jax.local_device_count()
  )
  tiles = np.zeros((jax.local_device_count(), 1, 16, 16, 2), np.float32)
  window = predictor._device_window((16, 16))[1]
  args = (predictor._variables, tiles, predictor._offset, predictor._scale, window)
  hlo = predictor._forward.lower(*args).compile().as_text()
  plain = jax.jit(predictor._weighted_probabilities).lower(*args).compile().as_text()
  # XLA:CPU's default wraps convolutions in YNNPACK fusions; the library's options do not.
  assert "ynn_fusion" in plain
  assert "ynn_fusion" not in hlo
