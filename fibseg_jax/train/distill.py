"""Distillation settings: which teacher, where its probabilities live, how much it weighs.

A student learns from a teacher's class probabilities over the whole stack (every slice,
annotated or not) besides the labels of the training area:

  fibseg train --config=unet --workdir=runs/student --config.data.path=vol.zarr \
    --config.distill.teacher=runs/s0,runs/s1,runs/s2 \
    --config.model.features='(8,8,16,32,64,8)'

`config.distill.teacher` names training workdirs (their best checkpoints, averaged as a
seed ensemble) or an existing probabilities array written by `fibseg segment
--probabilities`. Workdirs are segmented once, out of core and with the teacher's
test-time augmentation, into `WORKDIR/teacher/` before the first step
(`fibseg_jax.infer.distill.prepare_teacher`, which `fibseg train` calls); the training
loop then only reads that array. No label of any slice is read to make it, so the
evaluation slices' labels stay unseen.

`config.distill.teacher=forest` is the teacher for sparse labels (brush strokes): a
random forest on multiscale features (`fibseg_jax.baselines`, the ilastik route) is
fitted on the run's own training pixels (the validation blocks and evaluation slices
left out, as for the network) and its probabilities over every slice are the teacher.
From strokes the forest generalises better than a network that sees only the stroke
interiors; the network taught by it learns every slice from the forest and the strokes
(measured in docs/results.md, "Annotating less": ahead of both on the synthetic stack, level with
the forest on a real one). A directory named `forest` is given as `./forest`.
"""

from __future__ import annotations

import dataclasses
import json
import os

from fibseg_jax.data import volume as volume_lib
from fibseg_jax.train import config as config_lib
from fibseg_jax.train.config import ConfigError

# `--config.distill.teacher=FOREST`: a random forest fitted on the training pixels.
FOREST = "forest"
# Where `prepare_teacher` writes a workdir teacher's outputs, inside the student's workdir.
TEACHER_DIR = "teacher"
PROBABILITIES = "probabilities.zarr"
LABELS = "labels.zarr"
RECORD = "teacher.json"


@dataclasses.dataclass(frozen=True)
class Distill:
  """`config.distill` resolved: where the teacher's probabilities are.

  Attributes:
    members: the teacher's training workdirs (or checkpoint directories), () when the
      teacher is a probabilities array or a route.
    array: the probabilities array the loader reads: `array_path(workdir)` of the
      members, or the array given.
    weight: weight of `losses.soft_cross_entropy`; 0 trains as without a teacher.
    tta: the teacher's test-time augmentation (segment's --tta values).
    batch_size: global patches from the whole stack per step.
    route: `FOREST` when a random forest fitted on the training pixels is the teacher,
      else "".
  """

  members: tuple[str, ...]
  array: str
  weight: float
  tta: str
  batch_size: int
  route: str = ""

  @property
  def computed(self) -> bool:
    """Whether the array is computed (from workdirs or the route; else it was given)."""
    return bool(self.members) or bool(self.route)


def is_probabilities_array(path: str) -> bool:
  """Whether a local path is a zarr v3 array (not a group, not a training workdir)."""
  local = volume_lib.local_path(path)
  meta = os.path.join(local, "zarr.json") if local else None
  if not meta or not os.path.isfile(meta):
    return False
  try:
    with open(meta) as f:
      return json.load(f).get("node_type") == "array"
  except (OSError, ValueError, AttributeError):
    return False


def array_path(workdir: str) -> str:
  """The probabilities array `prepare_teacher` writes for a student in `workdir`."""
  return os.path.join(workdir, TEACHER_DIR, PROBABILITIES)


def settings(distill: config_lib.DistillSettings, workdir: str | None) -> Distill | None:
  """The teacher of `distill` resolved for a student in `workdir`; None when off.

  Raises:
    ConfigError: a teacher that is neither a workdir nor a probabilities array, a
      forest in an ensemble, or the student's own workdir among them.
  """
  names = distill.teacher
  if not names:
    return None
  teacher = ",".join(names)
  weight, tta, batch_size = distill.weight, distill.tta, distill.batch_size
  if FOREST in names:
    if len(names) > 1:
      raise ConfigError(
        f"--config.distill.teacher={teacher}: `{FOREST}` is a teacher on its own, not "
        "part of an ensemble"
      )
    if workdir is None:
      raise ConfigError("a forest teacher needs the student's workdir (it is written there)")
    return Distill((), array_path(workdir), weight, tta, batch_size, route=FOREST)
  arrays = [n for n in names if is_probabilities_array(n)]
  if arrays:
    if len(names) > 1:
      raise ConfigError(
        f"--config.distill.teacher={teacher}: give one probabilities array, or training "
        "workdirs only (not both)"
      )
    return Distill((), names[0], weight, tta, batch_size)
  for name in names:
    local = volume_lib.local_path(name) or name
    if not os.path.isdir(local):
      raise ConfigError(
        f"--config.distill.teacher: {name} is neither a training workdir nor a "
        "probabilities array (fibseg segment --probabilities)"
      )
    if workdir is not None and os.path.realpath(local) == os.path.realpath(workdir):
      raise ConfigError(
        f"--config.distill.teacher: {name} is the student's own --workdir; a teacher is "
        "another, finished run"
      )
  if workdir is None:
    raise ConfigError("distillation from training workdirs needs the student's workdir")
  return Distill(tuple(names), array_path(workdir), weight, tta, batch_size)
