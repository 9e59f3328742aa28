"""Error bars that count the model's measured errors, not only its members' spread.

The members of an ensemble (or the passes of TTA) agree closely and share their biases,
so the range of their phase fractions rarely holds the truth (BUILD_NOTES, "Which slice
next and the intervals"). The held-out validation blocks of the annotated slices (the
training loader's split: labelled, never trained on) show how a member errs, and the
volume fractions can be corrected for it ("adjusted classify and count", Forman 2008):
a member's stack fractions q are what its confusion C (rows: true class, columns:
predicted; measured on the blocks) makes of the true fractions p, q = C^T p, so p is
solved for (clipped at 0, summed to 1).

The blocks are resampled with replacement (bootstrap) for each member and the corrected
fractions of all members pooled; the interval is their central `level` share. It holds
the bias the blocks can see and the sampling error of so few blocks, so it is wider than
the members' range. What it cannot see: errors that differ between the annotated slices
and the rest of the stack (drift along z), and the blocks' use in choosing the
checkpoint. The other quantities keep the members' range: the surface density's bias
comes from slice-to-slice jitter of the boundaries along z, which no annotated slice
shows (scaling S_V by the in-plane boundary-length ratio of the blocks moved it away
from the truth where tried), and connectivity and pore sizes have no such correction.

  blocks = [calibration.held_out_blocks(vol, seg) for seg in member_segmentations]
  interval = calibration.calibrated_intervals(members, blocks, "3 seeds")
  report = calibration.combine(quantify.intervals(members, "3 seeds"), interval)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from fibseg_jax.data import loader as loader_lib
from fibseg_jax.data import split
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.eval import quantify
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import metrics_writer

IGNORE_LABEL = volume_lib.IGNORE_LABEL
CORRECTED = ("volume_fraction",)
KIND = (
  "volume fraction: {level:.0%} bootstrap interval over {blocks} held-out validation "
  "blocks x {members} member(s), corrected by the confusion matrix measured on them"
)


def training_split(run: dict[str, Any]) -> dict[str, Any] | None:
  """The split of the run a segmentation came from, read from its checkpoint's config.

  Args:
    run: the segmentation's run record (`store.Segmentation.run`).

  Returns:
    {"eval_slices", "val_fraction", "val_block", "split_seed"} (`held_out_blocks`'
    keywords; eval_slices as the config names them, the volume's slice numbers, which
    `volume.SliceNumbers.to_zs` turns into z), or None when the segmentation has no
    single checkpoint with a saved config (an ensemble's average, or a checkpoint moved
    away).
  """
  path = run.get("checkpoint")
  config = metrics_writer.checkpoint_config(path) if isinstance(path, str) else None
  if config is None:
    return None
  try:
    data = config_lib.parse(config).data
  except config_lib.ConfigError:
    return None
  return {
    "eval_slices": data.eval_slices,
    "val_fraction": data.val_fraction,
    "val_block": data.val_block,
    "split_seed": data.split_seed,
  }


def held_out_blocks(
  volume: volume_lib.Volume,
  segmentation: Any,
  *,
  eval_slices: Sequence[int] = (),
  val_fraction: float = 0.25,
  val_block: int = 128,
  split_seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
  """The validation blocks of the training split: (truth, prediction) pairs.

  Args:
    volume: the labelled volume the model was trained on.
    segmentation: its segmentation, a [z, y, x] array (tensorstore or numpy) covering
      the annotated slices.
    eval_slices, val_fraction, val_block, split_seed: the training run's split
      (`--config.data.*`); the blocks are its validation region.

  Returns:
    One (truth, prediction) pair of [h, w] uint8 per connected validation region of
    each annotated training slice, cut to its bounding box; truth is 255 off the region.

  Raises:
    ValueError: the split holds no validation pixel.
  """
  slices, masks = loader_lib.split_regions(
    volume,
    eval_slices=eval_slices,
    val_fraction=val_fraction,
    val_block=val_block,
    split_seed=split_seed,
  )
  pairs = []
  for z in slices:
    region = masks[z] == split.REGION_VALIDATION
    if not region.any():
      continue
    truth = volume.read_labels(z)
    pred = segmentation[z]
    pred = np.asarray(pred.read().result() if hasattr(pred, "read") else pred)
    components, _ = ndimage.label(region)
    for box in ndimage.find_objects(components):
      inside = region[box]
      pairs.append((np.where(inside, truth[box], IGNORE_LABEL).astype(np.uint8), pred[box]))
  if not pairs:
    raise ValueError(
      f"{volume_lib.describe(volume.root)}: the split holds no validation block to "
      "calibrate on (val_fraction 0?)"
    )
  return pairs


def _confusions(pairs: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
  """Confusion [block, true, predicted] of each (truth, prediction) block."""
  confusion = np.zeros((len(pairs), k, k), np.float64)
  for b, (truth, pred) in enumerate(pairs):
    known = truth != IGNORE_LABEL
    t, p = truth[known].astype(np.int64), np.minimum(pred[known].astype(np.int64), k - 1)
    confusion[b] = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
  return confusion


def corrected_fractions(fractions: np.ndarray, confusion: np.ndarray) -> np.ndarray:
  """True fractions p from predicted ones q and a confusion [true, predicted]: q = C^T p.

  Rows of `confusion` are normalised; a class without held-out pixels keeps its row of
  the identity. p is clipped at 0 and summed to 1.
  """
  k = len(fractions)
  rows = confusion.sum(1, keepdims=True)
  c = np.where(rows > 0, confusion / np.maximum(rows, 1), np.eye(k))
  p, *_ = np.linalg.lstsq(c.T, np.asarray(fractions, np.float64), rcond=None)
  p = np.clip(p, 0, None)
  total = p.sum()
  return p / total if total > 0 else np.asarray(fractions, np.float64)


def calibrated_intervals(
  members: Sequence[quantify.Quantification],
  blocks: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]],
  source: str,
  *,
  resamples: int = 1000,
  level: float = 0.95,
  seed: int = 0,
) -> dict[str, Any]:
  """Bias-corrected bootstrap intervals of the volume fractions.

  Args:
    members: >= 1 quantifications of the stack (one per member), same classes.
    blocks: for each member, its (truth, prediction) validation blocks (`held_out_blocks`).
    source: what the members are, for the report.
    resamples: bootstrap draws of the blocks per member.
    level: central share of the pooled corrected values the interval holds.
    seed: seed of the draws.

  Returns:
    As `quantify.intervals`: {"source", "kind", "members", "blocks", "phases": {phase:
    {"volume_fraction": {"min", "max", "mean", "std", "values"}}}}; "values" are the
    members' corrections with all blocks, "min".."max" the interval.
  """
  if not members or len(members) != len(blocks):
    raise ValueError(f"give one list of blocks per member: {len(members)} members, {len(blocks)}")
  names = [p.name for p in members[0].phases]
  k = len(names)
  rng = np.random.default_rng(seed)
  pooled: list[np.ndarray] = []
  point: list[np.ndarray] = []
  for member, pairs in zip(members, blocks, strict=True):
    if [p.name for p in member.phases] != names:
      raise ValueError("the members differ in their classes")
    confusion = _confusions(pairs, k)
    q = np.asarray([p.volume_fraction for p in member.phases], np.float64)
    draws = rng.integers(0, len(pairs), (resamples, len(pairs)))
    pooled.append(np.stack([corrected_fractions(q, confusion[d].sum(0)) for d in draws]))
    point.append(corrected_fractions(q, confusion.sum(0)))
  tail = 100 * (1 - level) / 2
  values = np.concatenate(pooled)
  low, high = np.percentile(values, (tail, 100 - tail), axis=0)
  phases = {
    name: {
      "volume_fraction": {
        "min": float(low[i]),
        "max": float(high[i]),
        "mean": float(values[:, i].mean()),
        "std": float(values[:, i].std(ddof=1)),
        "values": [float(v[i]) for v in point],
      }
    }
    for i, name in enumerate(names)
  }
  return {
    "source": source,
    "kind": KIND.format(
      level=level, blocks=sum(len(b) for b in blocks) // len(blocks), members=len(members)
    ),
    "members": len(members),
    "blocks": [len(b) for b in blocks],
    "phases": phases,
  }


def combine(spread: dict[str, Any], calibrated: dict[str, Any]) -> dict[str, Any]:
  """The members' ranges with the calibrated intervals in place of theirs where given."""
  phases = {
    name: {**quantities, **calibrated["phases"].get(name, {})}
    for name, quantities in spread["phases"].items()
  }
  return {
    **spread,
    "phases": phases,
    "kind": f"{calibrated['kind']}; other quantities: {spread['kind']}",
    "calibrated": list(CORRECTED),
  }
