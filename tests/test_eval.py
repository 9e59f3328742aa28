"""Evaluation: metrics against scikit-learn, phase fractions, the report, figures, the script."""

import json
import os
import subprocess
import sys
import uuid

import imageio.v3 as iio
import numpy as np
import pytest
import tensorstore as ts
import tifffile
from sklearn import metrics as skm

from fibseg_jax import eval as evaluation
from fibseg_jax.data import volume
from fibseg_jax.eval import quantify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATE = os.path.join(REPO, "experiments", "evaluate.py")
CLASSES = ("pore", "csh", "portlandite", "clinker")
SHAPE = (6, 40, 56)
ANNOTATED = (1, 4)


def random_labels(rng, shape, num_classes, absent=(), ignore_fraction=0.2):
  labels = rng.integers(0, num_classes, shape).astype(np.uint8)
  for c in absent:
    labels[labels == c] = (c + 1) % num_classes
  labels[rng.random(shape) < ignore_fraction] = 255
  return labels


def sklearn_scores(truth, pred, num_classes):
  mask = truth != 255
  t, p = truth[mask], pred[mask]
  labels = list(range(num_classes))
  kw = dict(labels=labels, average=None, zero_division=np.nan)
  # jaccard_score takes only 0 or 1 for zero_division: NaN where a class is in neither.
  in_neither = ~np.isin(labels, np.union1d(t, p))
  iou = skm.jaccard_score(t, p, labels=labels, average=None, zero_division=0)
  return {
    "confusion": skm.confusion_matrix(t, p, labels=labels),
    "iou": np.where(in_neither, np.nan, iou),
    "dice": skm.f1_score(t, p, **kw),
    "precision": skm.precision_score(t, p, **kw),
    "recall": skm.recall_score(t, p, **kw),
    "accuracy": skm.accuracy_score(t, p),
  }


# --- metrics --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(seed):
  rng = np.random.default_rng(seed)
  truth = random_labels(rng, (37, 53), 4, absent=(3,))  # class 3 never in the truth
  pred = rng.integers(0, 4, truth.shape).astype(np.uint8)
  # Better than chance, so scores differ between classes.
  keep = rng.random(truth.shape) < 0.6
  pred[keep & (truth != 255)] = truth[keep & (truth != 255)]
  pred[pred == 2] = 1  # class 2 never predicted
  m = evaluation.segmentation_metrics(truth, pred, 4)
  ref = sklearn_scores(truth, pred, 4)
  np.testing.assert_array_equal(m.confusion, ref["confusion"])
  for name in ("iou", "dice", "precision", "recall"):
    np.testing.assert_allclose(getattr(m, name), ref[name], rtol=1e-12, equal_nan=True)
  assert m.accuracy == pytest.approx(ref["accuracy"], rel=1e-12)
  assert np.isnan(m.recall[3]) and np.isnan(m.precision[2]) and m.iou[3] == 0.0
  assert m.mean_iou == pytest.approx(np.nanmean(ref["iou"]), rel=1e-12)
  assert m.voxels == int(np.count_nonzero(truth != 255))


def test_class_absent_from_both_is_nan_and_left_out_of_the_mean():
  truth = np.array([[0, 0, 1, 255]], np.uint8)
  pred = np.array([[0, 1, 1, 2]], np.uint8)
  m = evaluation.segmentation_metrics(truth, pred, 3)
  # Class 2 is only predicted on an unannotated voxel, so it is absent from both.
  assert np.isnan(m.iou[2]) and np.isnan(m.dice[2])
  np.testing.assert_allclose(m.iou[:2], [1 / 2, 1 / 2])
  assert m.mean_iou == pytest.approx(0.5) and m.accuracy == pytest.approx(2 / 3)
  np.testing.assert_allclose(m.truth_fractions, [2 / 3, 1 / 3, 0])
  np.testing.assert_allclose(m.predicted_fractions, [1 / 3, 2 / 3, 0])


def test_confusion_matrix_rejects_what_cannot_be_compared():
  with pytest.raises(evaluation.MetricsError, match=r"truth shape \(2, 3\) != prediction"):
    evaluation.confusion_matrix(np.zeros((2, 3)), np.zeros((3, 2)), 2)
  with pytest.raises(evaluation.MetricsError, match=r"prediction holds labels \[7\] outside 0..2"):
    evaluation.confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 7), 3)


def test_stack_fractions_stream_slice_by_slice():
  rng = np.random.default_rng(3)
  stack = random_labels(rng, (5, 20, 30), 4, ignore_fraction=0.05)
  acc = evaluation.StackFractions(4)
  for z in range(5):
    acc.add(z, stack[z])
  valid = stack[stack != 255]
  np.testing.assert_allclose(acc.fractions(), np.bincount(valid, minlength=4) / valid.size)
  np.testing.assert_allclose(acc.slice_fractions().sum(1), 1.0)
  z2 = stack[2][stack[2] != 255]
  np.testing.assert_allclose(acc.slice_fractions()[2], np.bincount(z2, minlength=4) / z2.size)
  assert acc.unlabelled == int(np.count_nonzero(stack == 255))


def test_class_colors_are_stable_and_distinct():
  a, b = evaluation.class_colors(4), evaluation.class_colors(12)
  np.testing.assert_array_equal(a, b[:4])
  assert len({tuple(c) for c in b}) == 12 and a.min() >= 0 and a.max() <= 1


# --- report ---------------------------------------------------------------------------


@pytest.fixture()
def dataset(tmp_path):
  """A volume with hand labels on two slices and a prediction that is mostly right."""
  rng = np.random.default_rng(0)
  truth = rng.integers(0, 4, (SHAPE[0], SHAPE[1] // 4, SHAPE[2] // 4))
  truth = truth.repeat(4, 1).repeat(4, 2).astype(np.uint8)
  root = str(tmp_path / "vol.zarr")
  with volume.create_volume(
    root,
    shape=SHAPE,
    dtype="uint8",
    channels=("ICE", "TLD"),
    classes=CLASSES,
    voxel_size_nm=(50, 25, 25),
  ) as w:
    for z in range(SHAPE[0]):
      image = np.stack([40 + 50 * truth[z], 200 - 40 * truth[z]], -1).astype(np.uint8)
      labels = truth[z].copy() if z in ANNOTATED else None
      if labels is not None:
        labels[:, :8] = 255  # partly annotated
      w.write_slice(z, image, labels)
    w.commit()
  pred = truth.copy()
  flip = rng.random(SHAPE) < 0.1
  pred[flip] = (pred[flip] + 1) % 4
  pred_path = str(tmp_path / "seg.zarr")
  write_prediction(pred_path, pred, CLASSES, source=root)
  return {"root": root, "truth": truth, "pred": pred, "pred_path": pred_path, "tmp": tmp_path}


def write_prediction(path, labels, classes, source=None, run=None):
  """A label array as `fibseg segment` writes it; `run` (or {"source": source}) is its run
  record."""
  attrs = {"classes": list(classes)}
  if source or run:
    attrs["fibseg_segmentation"] = {"kind": "labels", "run": run or {"source": source}}
  arr = ts.open(
    {
      "driver": "zarr3",
      "kvstore": volume.kvstore_spec(path),
      "metadata": {
        "shape": list(labels.shape),
        "data_type": "uint8",
        "fill_value": 255,
        "chunk_grid": {
          "name": "regular",
          "configuration": {"chunk_shape": [1, *labels.shape[1:]]},
        },
        "attributes": attrs,
      },
      "create": True,
      "delete_existing": True,
    },
    context=volume.CONTEXT,
  ).result()
  arr.write(labels).result()


def expected_overall(d, slices):
  vol = volume.open_volume(d["root"])
  t = np.stack([vol.read_labels(z) for z in slices])
  return sklearn_scores(t, d["pred"][list(slices)], 4)


def test_report_matches_sklearn_and_names_its_figures(dataset):
  d = dataset
  report = evaluation.evaluate(d["pred_path"], d["root"])
  assert report.slices == ANNOTATED and report.classes == CLASSES
  ref = expected_overall(d, ANNOTATED)
  np.testing.assert_array_equal(report.overall.confusion, ref["confusion"])
  np.testing.assert_allclose(report.overall.iou, ref["iou"], rtol=1e-12)
  out = d["tmp"] / "report"
  paths = evaluation.write_report(report, out)
  with open(paths["json"]) as f:
    doc = json.load(f)
  assert doc["slices"] == list(ANNOTATED) and doc["classes"] == list(CLASSES)
  assert doc["overall"]["accuracy"] == pytest.approx(ref["accuracy"])
  assert doc["overall"]["mean_iou"] == pytest.approx(np.nanmean(ref["iou"]))
  for i, name in enumerate(CLASSES):
    entry = doc["overall"]["per_class"][name]
    assert entry["dice"] == pytest.approx(ref["dice"][i])
    assert entry["precision"] == pytest.approx(ref["precision"][i])
    assert entry["recall"] == pytest.approx(ref["recall"][i])
  stack = np.bincount(d["pred"].ravel(), minlength=4) / d["pred"].size
  np.testing.assert_allclose(list(doc["stack"]["predicted_fractions"].values()), stack)
  assert len(doc["stack"]["per_slice_fractions"]) == SHAPE[0]
  porosity = doc["phase_quantities"]["porosity"]
  assert porosity["class"] == "pore"
  assert porosity["predicted_whole_stack"] == pytest.approx(stack[0])
  assert doc["phase_quantities"]["unhydrated fraction"]["class"] == "clinker"
  md = open(paths["markdown"]).read()
  assert "| pore |" in md and "porosity (pore)" in md and "slice_0004.png" in md
  assert f"| accuracy | {ref['accuracy']:.4f} |" in md
  for z in ANNOTATED:
    image = iio.imread(paths["slices"][z])
    assert image.shape[1] > 2 * image.shape[0]  # five panels side by side
    red = np.all(image[..., :3] == [219, 20, 26], axis=-1)  # the error colour
    assert red.any()
  assert iio.imread(paths["fractions"]).shape[0] > 100

  # The predicted microstructure, on the whole (small) stack with its voxel size.
  structure = doc["structure"]
  assert structure["subvolume"]["whole_stack"] and structure["voxel_size_nm"] == [50, 25, 25]
  for i, name in enumerate(CLASSES):
    assert structure["phases"][name]["volume_fraction"] == pytest.approx(stack[i])
  assert structure["phases"]["pore"]["size_distribution"]["d50_nm"] > 0
  assert structure["phases"]["csh"]["size_distribution"] is None
  assert "## Microstructure of the prediction" in md and "| pore | " in md
  # 6 slices of 50 nm: 0.3 µm deep, so what percolates comes with its caveat beside the
  # number, in the JSON and the report.
  flagged = [c for p in structure["phases"].values() for c in p["caveats"]]
  assert flagged and "**Caveats** (the numbers above stand" in md
  assert all(f"- {c}." in md for c in flagged)
  assert "![pore sizes](pore_sizes.png)" in md and doc["figures"]["structure"] == "structure.png"
  assert iio.imread(paths["structure"]).shape[0] > 100


def test_truth_from_label_images_gives_the_same_scores(dataset):
  d = dataset
  vol = volume.open_volume(d["root"])
  folder = d["tmp"] / "labels"
  folder.mkdir()
  tifffile.imwrite(folder / "labels_s0001.tif", vol.read_labels(1))
  iio.imwrite(folder / "labels_s0004.png", vol.read_labels(4))
  from_files = evaluation.evaluate(d["pred_path"], str(folder / "labels_*"))
  from_volume = evaluation.evaluate(d["pred_path"], d["root"])
  assert from_files.slices == ANNOTATED and from_files.classes == CLASSES
  np.testing.assert_array_equal(from_files.overall.confusion, from_volume.overall.confusion)
  # The figures take their images from the prediction's source volume.
  assert from_files.image is not None and from_files.image.channels == ("ICE", "TLD")
  one = evaluation.evaluate(d["pred_path"], str(folder / "labels_*"), slices=[4])
  np.testing.assert_array_equal(one.overall.confusion, from_volume.per_slice[4].confusion)


def test_evaluation_mistakes_are_named(dataset):
  d = dataset
  with pytest.raises(
    evaluation.EvaluationError,
    match=r"--slices: no slice number 9 in this stack; its slices are numbered 0..5",
  ):
    evaluation.evaluate(d["pred_path"], d["root"], slices=[9])
  with pytest.raises(evaluation.EvaluationError, match=r"--slices: \[2\] have no labels"):
    evaluation.evaluate(d["pred_path"], d["root"], slices="2")
  small = f"memory://pred-{uuid.uuid4().hex[:6]}"
  write_prediction(small, d["pred"][:, :20], CLASSES)
  with pytest.raises(evaluation.EvaluationError, match=r"is \[6, 20, 56\].*is \[6, 40, 56\]"):
    evaluation.evaluate(small, d["root"])
  renamed = f"memory://pred-{uuid.uuid4().hex[:6]}"
  write_prediction(renamed, d["pred"], ("a", "b", "c", "d"))
  with pytest.raises(evaluation.EvaluationError, match="must name the same phases"):
    evaluation.evaluate(renamed, d["root"])
  unfinished = f"memory://pred-{uuid.uuid4().hex[:6]}"
  partial = d["pred"].copy()
  partial[4, 30:] = 255
  write_prediction(unfinished, partial, CLASSES)
  with pytest.raises(evaluation.EvaluationError, match="slice 4 has .* not segmented yet"):
    evaluation.evaluate(unfinished, d["root"])
  with pytest.raises(evaluation.EvaluationError, match="is a zarr group"):
    evaluation.evaluate(d["root"], d["root"])
  with pytest.raises(evaluation.EvaluationError, match="no files match"):
    evaluation.evaluate(d["pred_path"], str(d["tmp"] / "nothing" / "*.tif"))
  with pytest.raises(evaluation.EvaluationError, match=r"--size_classes: classes \['air'\]"):
    evaluation.evaluate(d["pred_path"], d["root"], size_classes=["air"])
  with pytest.raises(evaluation.EvaluationError, match="expected slice numbers"):
    evaluation.parse_slices("4,x")
  assert evaluation.parse_slices("9, 2-4,3") == (2, 3, 4, 9)


def test_evaluate_script(dataset):
  d = dataset
  out = str(d["tmp"] / "report")
  cmd = [sys.executable, EVALUATE, f"--prediction={d['pred_path']}", f"--truth={d['root']}"]
  proc = subprocess.run([*cmd, "--slices=4", f"--out={out}"], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert f"report:  {out}/report.md" in proc.stdout
  assert f"figure:  {out}/slice_0004.png" in proc.stdout and "porosity (pore)" in proc.stdout
  assert sorted(os.listdir(out)) == [
    ".fibseg-output.json",  # marks the folder as a report, which a rerun may replace
    "fractions_z.png",
    "pore_sizes.png",
    "report.json",
    "report.md",
    "slice_0004.png",
    "structure.png",
  ]
  assert "structure on the whole stack" in proc.stdout and "  pore: largest cluster" in proc.stdout
  proc = subprocess.run([*cmd, "--slices=60", f"--out={out}"], capture_output=True, text=True)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
    "error: --slices: no slice number 60 in this stack; its slices are numbered 0..5 (the "
    "numbers of its files, as ingest read them)"
  ]


def test_label_glob_follows_the_instruments_slice_numbers(tmp_path):
  """Instruments number from 1: labels_0003.tif belongs to the z ingest gave image 3."""
  from fibseg_jax.data import ingest  # noqa: PLC0415

  rng = np.random.default_rng(3)
  truth = rng.integers(0, 4, (4, 16, 16)).astype(np.uint8)
  for d in ("ICE", "labels"):
    (tmp_path / d).mkdir()
  for number in range(1, 5):  # files 1..4 -> z 0..3
    tifffile.imwrite(tmp_path / "ICE" / f"img_{number:04d}.tif", truth[number - 1] * 50)
  tifffile.imwrite(tmp_path / "labels" / "labels_0003.tif", truth[2])
  root = str(tmp_path / "vol.zarr")
  plan = ingest.plan_ingest({"ICE": str(tmp_path / "ICE" / "*.tif")}, None, CLASSES)
  ingest.ingest(plan, root, voxel_size_nm=(1, 1, 1), progress=False)
  pred_path = str(tmp_path / "seg.zarr")
  write_prediction(pred_path, truth, CLASSES, source=root)
  report = evaluation.evaluate(pred_path, str(tmp_path / "labels" / "*.tif"))
  assert list(report.slices) == [2]
  assert report.overall.accuracy == 1.0


def test_palette_png_truth_is_read_as_class_indices(tmp_path):
  """Annotation tools save indexed colour: the truth is the indices, not the colours."""
  import PIL.Image  # noqa: PLC0415

  rng = np.random.default_rng(4)
  truth = rng.integers(0, 3, (2, 16, 16)).astype(np.uint8)
  palette = np.zeros((256, 3), np.uint8)
  palette[:3] = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]  # no colour equals its index
  (tmp_path / "labels").mkdir()
  for z in range(2):
    image = PIL.Image.fromarray(truth[z], mode="P")
    image.putpalette(palette.ravel().tolist())
    image.save(tmp_path / "labels" / f"labels_{z}.png")
  opened = evaluation.open_truth(str(tmp_path / "labels" / "*.png"))
  for z in range(2):
    np.testing.assert_array_equal(opened.read(z), truth[z])


def _grow(labels, phase, steps):
  """`phase` grown (steps > 0) or shrunk (< 0) by |steps| voxels in y and x."""
  from scipy import ndimage

  mask = labels == phase
  out = labels.copy()
  for _ in range(abs(steps)):
    if steps > 0:
      grown = ndimage.binary_dilation(mask, structure=np.ones((1, 3, 3), bool))
      out[grown & ~mask] = phase
      mask = grown
    else:
      shrunk = ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3), bool))
      # Give the lost rim to the most common other phase around it.
      out[mask & ~shrunk] = (phase + 1) % 4
      mask = shrunk
  return out


def test_intervals_over_members_bracket_the_truth_when_they_err_both_ways(dataset):
  d = dataset
  truth = d["truth"]
  paths = []
  for name, steps in (("over", 1), ("under", -1), ("over2", 2)):
    path = str(d["tmp"] / f"seg_{name}.zarr")
    write_prediction(path, _grow(truth, 0, steps), CLASSES, source=d["root"])
    paths.append(path)
  report = evaluation.evaluate(paths[0], d["root"], members=paths[1:2])
  iv = report.intervals
  assert iv["members"] == 2 and "seg_under.zarr" in iv["source"]
  fraction = iv["phases"][CLASSES[0]]["volume_fraction"]
  exact = float(np.mean(truth == 0))
  assert fraction["min"] < exact < fraction["max"]  # one member over, one under
  assert len(fraction["values"]) == 2  # the member, then --prediction
  truth_q = quantify.quantify(truth, CLASSES, (50, 25, 25))
  assert quantify.coverage(iv, truth_q)[CLASSES[0]]["volume_fraction"]
  # Two members that both overshoot give an interval that misses the truth: coverage
  # is measured, not assumed.
  both_over = evaluation.evaluate(paths[0], d["root"], members=paths[2:])
  assert not quantify.coverage(both_over.intervals, truth_q)[CLASSES[0]]["volume_fraction"]
  out = str(d["tmp"] / "report_iv")
  evaluation.write_report(report, out)
  text = open(os.path.join(out, "report.md")).read()
  assert "How much the numbers depend on the model (2 segmentations)" in text
  assert json.load(open(os.path.join(out, "report.json")))["intervals"]["members"] == 2
  proc = subprocess.run(
    [sys.executable, EVALUATE, f"--prediction={paths[0]}", f"--truth={d['root']}"]
    + [f"--members={paths[1]}", f"--out={d['tmp'] / 'cli_iv'}", "--slices=1"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "intervals over 2 segmentations (min .. max):" in proc.stdout
  assert "calibration: not done: no single training checkpoint" in proc.stdout
  wrong = str(d["tmp"] / "small.zarr")
  write_prediction(wrong, truth[:2], CLASSES)
  with pytest.raises(evaluation.EvaluationError, match=r"--members: .*small.zarr is \[2,"):
    evaluation.evaluate(paths[0], d["root"], members=[wrong])
