"""The benchmark's headline figures: one key each, its target, and how it is computed."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fibseg_jax.bench.options import RACE, SENSOR3D, STUDY


@dataclasses.dataclass(frozen=True)
class Key:
  """One headline figure.

  Attributes:
    name: its key in benchmark.json.
    target: the value it should reach, or None (reported, no target).
    higher_is_better: the target is a minimum (else a maximum).
    meaning: one line for the report.
  """

  name: str
  target: float | None
  higher_is_better: bool
  meaning: str

  @property
  def target_text(self) -> str:
    if self.target is None:
      return "-"
    return f"{'>=' if self.higher_is_better else '<='} {self.target:g}"

  def status(self, value: float | None) -> str:
    """ "met", "not met", or "n.a." (no value, or no target)."""
    if value is None or self.target is None:
      return "n.a."
    met = value >= self.target if self.higher_is_better else value <= self.target
    return "met" if met else "not met"


def step_key(study_name: str) -> str:
  """The key of a study configuration's median train step time, e.g. step_s_unet_ice_1."""
  return f"step_s_{study_name}"


KEYS: tuple[Key, ...] = (
  Key(
    "train_speedup_vs_monai",
    1.2,
    True,
    f"MONAI median train step / fibseg_jax's ({RACE}, alternating, fp32 unless --dtype)",
  ),
  Key("infer_speedup_vs_monai", 1.5, True, "MONAI median forward / fibseg_jax's, same batch"),
  Key(
    "train_flop_utilisation",
    None,
    True,
    f"XLA cost-analysis FLOP/s of the {RACE} train step over measured dense matmul FLOP/s",
  ),
  Key(
    "loader_headroom",
    10.0,
    True,
    "slab loader patches/s (uncached, default chunk) over what a train step consumes",
  ),
  Key(
    "loader_headroom_full_recipe",
    10.0,
    True,
    "the same with every augmentation part on (data.loader.RECIPE_PARTS)",
  ),
  Key(
    "segment_efficiency",
    0.9,
    True,
    "whole-volume segmentation Mpixel/s end to end over the bare forward's, same tiles",
  ),
  Key("segment_rss_ratio", 1.15, False, "peak RSS segmenting a 4x volume over a 1x volume"),
  Key(
    "segment_mpx_per_s",
    1.0,
    True,
    "whole-stack segmentation with default flags (tta=auto), Mpixel/s end to end, warm",
  ),
  Key(
    "segment_race_vs_monai",
    1.5,
    True,
    "MONAI sliding_window_inference + zarr write over fibseg_jax's, same weights, tile, "
    "overlap, Gaussian blending and stack (alternating)",
  ),
  Key(
    "sensor3d_step_ratio",
    2.5,
    False,
    f"{SENSOR3D} train step / {RACE} (same batch, patch, slices, channels); lower is better",
  ),
  *(
    Key(
      step_key(c.name),
      None,
      False,
      f"median train step (s): {c.model}, {c.slices} slice(s), {'+'.join(c.channels)}",
    )
    for c in STUDY
  ),
)
KEY_NAMES = tuple(k.name for k in KEYS)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
  """numerator / denominator, or None when either is missing or the denominator is not > 0."""
  if numerator is None or denominator is None or denominator <= 0:
    return None
  return numerator / denominator


def flop_utilisation(step_flops: float | None, step_s: float, matmul_flops_per_s: float):
  """(step FLOPs / step seconds) / the matmul reference's FLOP/s; None without FLOPs."""
  return ratio(ratio(step_flops, step_s), matmul_flops_per_s)


def loader_headroom(loader_patches_per_s: float, batch: int, step_s: float) -> float | None:
  """Loader patches/s over the patches/s a train step consumes (batch / step seconds)."""
  return ratio(loader_patches_per_s, ratio(batch, step_s))


def collect(details: Mapping[str, Any], batch: int, peer_note: str) -> dict[str, Any]:
  """Every key's value from the detailed measurements; None with a note where missing.

  Args:
    details: the run's sections: "race", "study", "matmul", "data_path", "segmentation",
      "segment_race".
    batch: the training batch.
    peer_note: why there is no MONAI peer ("" when it ran).

  Returns:
    {"values": {key: float or None}, "notes": {key: why it is None}}.
  """
  values: dict[str, float | None] = {}
  notes: dict[str, str] = {}
  race = details["race"]
  for key, phase in (("train_speedup_vs_monai", "train"), ("infer_speedup_vs_monai", "infer")):
    sides = race[phase]
    if "monai" in sides:
      values[key] = ratio(sides["monai"]["step_s_median"], sides["fibseg_jax"]["step_s_median"])
    else:
      values[key] = None
      notes[key] = peer_note or "MONAI was not measured"
  study = details["study"]
  race_step = study[RACE]["step_s_median"]
  matmul = details["matmul"]
  values["train_flop_utilisation"] = flop_utilisation(
    study[RACE]["flops"], race_step, matmul["flops_per_s"]
  )
  if values["train_flop_utilisation"] is None:
    notes["train_flop_utilisation"] = "XLA's cost analysis gave no FLOP count on this backend"
  row = details["data_path"]["headroom_row"]
  values["loader_headroom"] = loader_headroom(row["patches_per_s_uncached"], batch, race_step)
  values["loader_headroom_full_recipe"] = loader_headroom(
    row["patches_per_s_uncached_full_recipe"], batch, race_step
  )
  segmentation = details["segmentation"]
  values["segment_efficiency"] = segmentation["efficiency"]
  if segmentation["efficiency"] is None:
    notes["segment_efficiency"] = segmentation.get("note", "not measured")
  values["segment_rss_ratio"] = segmentation["rss_ratio"]
  race = details["segment_race"]
  values["segment_mpx_per_s"] = race["segment_mpx_per_s"]
  values["segment_race_vs_monai"] = race.get("segment_race_vs_monai")
  if values["segment_race_vs_monai"] is None:
    notes["segment_race_vs_monai"] = race.get("note") or peer_note or "MONAI was not measured"
  values["sensor3d_step_ratio"] = ratio(study[SENSOR3D]["step_s_median"], race_step)
  for c in STUDY:
    values[step_key(c.name)] = study[c.name]["step_s_median"]
  assert set(values) == set(KEY_NAMES), set(KEY_NAMES) ^ set(values)
  return {"values": {k: values[k] for k in KEY_NAMES}, "notes": notes}
