"""Annotation sets drawn from truth (strokes, slices, every Nth) and the effort curve."""

import json
import os

import numpy as np
import pytest

from fibseg_jax.data import annotations, synth
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.study import budget as budget_lib
from fibseg_jax.study import effort, ranking
from fibseg_jax.study.comparison import synthetic_volume
from fibseg_jax.study.context import OneStack
from fibseg_jax.train import metrics_writer


def _truth(seed=0, shape=(1, 128, 128)):
  config = synth.SynthConfig(shape=shape, voxel_size_nm=(100.0, 50.0, 50.0), seed=seed)
  return synth.generate(config).labels[0]


@pytest.mark.parametrize("fraction", [0.005, 0.02, 0.1])
def test_strokes_paint_only_true_classes_near_the_asked_share(fraction):
  truth = _truth()
  painted = annotations.strokes(truth, fraction, seed=3)
  mask = painted != annotations.IGNORE_LABEL
  assert np.array_equal(painted[mask], truth[mask])  # never a wrong class
  share = mask.mean()
  assert 0.5 * fraction <= share <= 1.6 * fraction, share
  # Every class present gets strokes, in roughly equal shares (a class thinner than its
  # share may get less, never none).
  counts = [int((painted == c).sum()) for c in np.unique(truth)]
  assert min(counts) > 0
  # Strokes, not blobs: far fewer painted pixels than the regions they lie in.
  assert mask.sum() < 0.25 * truth.size


def test_strokes_depend_on_the_seed_and_nothing_else():
  truth = _truth()
  a = annotations.strokes(truth, 0.02, seed=[0, 5])
  assert np.array_equal(a, annotations.strokes(truth, 0.02, seed=[0, 5]))
  assert not np.array_equal(a, annotations.strokes(truth, 0.02, seed=[1, 5]))


def test_strokes_leave_unknown_truth_unpainted():
  truth = _truth()
  truth[:, :64] = annotations.IGNORE_LABEL
  painted = annotations.strokes(truth, 0.05, seed=0)
  assert (painted[:, :64] == annotations.IGNORE_LABEL).all()


@pytest.mark.parametrize(
  "text", ["strokes", "strokes:0", "strokes:2", "slices:0", "slices:1.5", "every:x", "lines:3"]
)
def test_level_mistakes_name_the_flag_and_the_forms(text):
  with pytest.raises(ValueError, match=r"--levels: .* strokes:F .* slices:N or every:N"):
    annotations.Level.parse(text)


def test_levels_choose_spread_slices():
  train, pool = [4, 10, 16], [z for z in range(24) if z != 20]
  assert annotations.Level.parse("strokes:0.02").slices(train, pool) == train
  assert annotations.Level.parse("slices:1").slices(train, pool) == [10]
  assert annotations.Level.parse("slices:3").slices(train, pool) == train
  five = annotations.Level.parse("slices:5").slices(train, pool)
  assert len(five) == 5 and 20 not in five and five == sorted(five)
  assert min(np.diff(five)) >= 3  # evenly spread over the stack, not bunched
  assert annotations.Level.parse("every:4").slices(train, pool) == pool[2::4]
  with pytest.raises(ValueError, match="slices:40: only 23"):
    annotations.Level.parse("slices:40").slices(train, pool)


def test_drift_grows_the_artifacts_along_z_only():
  base = dict(shape=(4, 64, 64), voxel_size_nm=(100.0, 50.0, 50.0), seed=0)
  still = synth.generate(synth.SynthConfig(**base))
  drifting = synth.generate(synth.SynthConfig(**base, drift=1.0))
  assert np.array_equal(still.image[0], drifting.image[0])  # slice 0: as without drift
  assert np.array_equal(still.labels, drifting.labels)  # the material is the same
  for z in range(1, 4):
    assert not np.array_equal(still.image[z], drifting.image[z])
  assert "drift" not in synth.SynthConfig(**base).to_json()  # old stacks keep their metadata
  assert synth.SynthConfig(**base, drift=1.0).at_slice(3).noise == 2.0
  with pytest.raises(ValueError, match="drift must be a number >= 0"):
    synth.SynthConfig(**base, drift=-1)


def test_effort_curve_trains_from_strokes_and_resumes(tmp_path):
  """A stroke-only annotation trains the network, the forest and the network taught by
  the forest; a rerun redoes nothing."""
  budget = budget_lib.SMOKE
  path = str(tmp_path / "vol.zarr")
  synthetic_volume(path, budget, annotate=range(budget.shape[0]))
  out = str(tmp_path / "effort")
  stack = OneStack(
    volume=path,
    channels=["ICE", "TLD"],
    slices=1,
    seeds=[0],
    train_slices=budget.train_slices,
    eval_slices=budget.eval_slices,
  )
  kwargs = dict(levels=["strokes:0.05", "slices:1"])
  document = effort.run_effort(out, budget, stack, **kwargs)
  strokes_row, slice_row = document["rows"]
  assert strokes_row["labelled_pixels"] < 0.2 * slice_row["labelled_pixels"] * len(
    strokes_row["slices"]
  )
  for row in document["rows"]:
    for method in ("network", "forest", "taught"):
      assert 0 < row[method]["mean_iou"]["mean"] <= 1
    assert row["taught_minus_forest"]["mean"] == pytest.approx(
      row["taught"]["mean_iou"]["mean"] - row["forest"]["mean_iou"]["mean"]
    )
  taught = os.path.join(out, "strokes_0.05", "taught_s0", "run")
  assert metrics_writer.saved_config(taught)["distill"]["teacher"] == "forest"
  assert os.path.isdir(os.path.join(taught, "teacher", "probabilities.zarr"))
  # The annotated volume holds only the strokes (255 elsewhere), on the training slices.
  stroke_set = volume_lib.open_volume(os.path.join(out, "sets", "strokes_0.05_s0", "volume.zarr"))
  assert list(stroke_set.metadata.annotated_slices) == sorted(budget.train_slices)
  z = budget.train_slices[0]
  painted = stroke_set.read_labels(z) != annotations.IGNORE_LABEL
  assert 0.02 < painted.mean() < 0.1
  truth = volume_lib.open_volume(path)
  assert np.array_equal(stroke_set.read_labels(z)[painted], truth.read_labels(z)[painted])
  for name in ("effort.json", "effort.md", "effort.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  assert "| strokes:0.05 |" in open(os.path.join(out, "effort.md")).read()
  # Rerun: every run is cached, the same numbers come back.
  result = os.path.join(out, "strokes_0.05", "network_s0", "result.json")
  before = os.path.getmtime(result)
  again = effort.run_effort(out, budget, stack, **kwargs)
  assert os.path.getmtime(result) == before
  assert json.dumps(again["rows"]) == json.dumps(document["rows"])


def test_effort_refuses_evaluation_slices_without_truth(tmp_path):
  budget = budget_lib.SMOKE
  path = str(tmp_path / "vol.zarr")
  synthetic_volume(path, budget)  # truth on the training and evaluation slices only
  bare = [z for z in range(budget.shape[0]) if z not in (*budget.train_slices, *budget.eval_slices)]
  with pytest.raises(ValueError, match=rf"evaluation slices \[{bare[0]}\] carry no truth"):
    effort.run_effort(
      str(tmp_path / "effort"),
      budget,
      OneStack(
        volume=path,
        channels=["ICE"],
        slices=1,
        seeds=[0],
        train_slices=budget.train_slices,
        eval_slices=[bare[0]],
      ),
    )


def test_ranking_study_compares_three_fourth_slices_and_counts_coverage(tmp_path):
  budget = budget_lib.SMOKE
  path = str(tmp_path / "vol.zarr")
  synthetic_volume(path, budget, annotate=range(budget.shape[0]), drift=1.0)
  out = str(tmp_path / "ranking")
  document = ranking.run_ranking(
    out,
    budget,
    OneStack(
      volume=path,
      channels=["ICE", "TLD"],
      slices=1,
      seeds=[0, 1],
      train_slices=budget.train_slices,
      eval_slices=budget.eval_slices,
    ),
  )
  rows = document["rows"]
  assert set(rows) == {"three slices", "disagreement", "entropy", "random"}
  pick = rows["disagreement"]["slices"][0]
  taken = {*budget.train_slices, *budget.eval_slices}
  assert pick not in taken and all(z not in taken for z in rows["random"]["slices"])
  assert pick not in rows["random"]["slices"]  # the random slice is another one
  iv = document["intervals"]
  assert iv["members"] == 2 and 0 <= iv["covered_share"] <= 1
  cal = iv["calibrated"]  # the fractions corrected on each seed's validation blocks
  assert set(cal["covered_per_seed"]) == {0, 1} and set(cal["phases"]) == set(iv["phases"])
  text = open(os.path.join(out, "ranking.md")).read()
  assert "| + a random slice |" in text and "Calibrated volume fractions" in text
  with pytest.raises(ValueError, match="needs >= 2 seeds"):
    ranking.run_ranking(out, budget, OneStack(**{**_ranking_args(path, budget), "seeds": [0]}))


def _ranking_args(path, budget):
  return dict(
    volume=path,
    channels=["ICE"],
    slices=1,
    seeds=[0, 1],
    train_slices=budget.train_slices,
    eval_slices=budget.eval_slices,
  )
