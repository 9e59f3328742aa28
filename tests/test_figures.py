"""Figures a materials scientist would publish: class colours by name everywhere (the
figures and the OME-Zarr label colours), scale bars, plain ticks in nm or µm, titles that
name the stack."""

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

from fibseg_jax.data import ome, palette, synth, volume
from fibseg_jax.eval import figures, quantify, uncertainty
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import metrics_writer

CEMENT = ("pore", "csh", "portlandite", "clinker")


@pytest.fixture()
def drawn(monkeypatch):
  """Every Figure saved during the test, in order (to look at its artists)."""
  saved = []
  original = Figure.savefig

  def savefig(self, *args, **kwargs):
    saved.append(self)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(Figure, "savefig", savefig)
  return saved


def draw(fig):
  """Draws `fig` on an Agg canvas (where text has a size); returns the renderer."""
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  return canvas.get_renderer()


def scale_bars(ax):
  return [a for a in ax.artists if isinstance(a, AnchoredSizeBar)]


def bar_label(bar):
  return "".join(t.get_text() for t in bar.txt_label.get_children())


def texts(fig):
  """Every text of a figure: suptitle, axes titles, labels, annotations."""
  out = [fig._suptitle.get_text()] if fig._suptitle is not None else []
  for ax in fig.axes:
    out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
    out += [t.get_text() for t in ax.texts]
  return out


# --- the palette ------------------------------------------------------------------------


def test_a_class_has_its_colour_whatever_its_index_and_the_class_count():
  four = palette.class_colors(CEMENT)
  three = palette.class_colors(("pore", "csh", "clinker"))
  alone = palette.class_colors(("clinker",))
  np.testing.assert_array_equal(four[3], three[2])
  np.testing.assert_array_equal(four[3], alone[0])
  np.testing.assert_array_equal(four[3], palette.FIXED_COLORS["clinker"])
  assert four[3][0] > 0.9 and four[3][2] < 0.3  # orange, not blue, in both
  # Spellings of the same phase get its colour; pores are dark.
  for name, same in (("C-S-H", "csh"), ("Pores", "pore"), ("void", "pore"), ("porosity", "pore")):
    assert palette.class_color(name) == palette.class_color(same), name
  assert max(palette.class_color("pore")) < 0.15
  for name in ("mitochondria", "Membranes", "background", "synapse", "portlandite"):
    assert palette.canonical(name) is not None, name
  # An unknown name too: the same colour at index 0 of two classes and index 2 of three.
  np.testing.assert_array_equal(
    palette.class_colors(("grain", "pore"))[0], palette.class_colors(("x", "y", "grain"))[2]
  )
  # Every module that colours classes gives the palette's colours.
  names = ("clinker", "binder", "pore")
  np.testing.assert_array_equal(ome.class_colors(names), palette.class_colors(names))
  np.testing.assert_array_equal(figures.class_colors(names), palette.class_colors(names))
  assert synth.CLASS_COLORS[synth.CLINKER] == palette.class_color("clinker")
  # A bare count means the phantom's phases, so older callers keep pore black.
  np.testing.assert_array_equal(palette.class_colors(3), palette.class_colors(CEMENT[:3]))


def test_unknown_names_get_deterministic_distinct_colours():
  names = ["grain", "binder", "glia", "lysosome", "fly ash", "resin block"]
  numbered = [f"class{i}" for i in range(12)]
  colours = {n: palette.class_color(n) for n in names + numbered}
  # The same in a fresh interpreter with another str hash seed: a hash of the name, not
  # Python's hash() nor the index.
  code = (
    "import json; from fibseg_jax.data import palette; "
    f"print(json.dumps([palette.class_color(n) for n in {names + numbered!r}]))"
  )
  env = {**os.environ, "PYTHONHASHSEED": "12345"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert [tuple(c) for c in json.loads(out.stdout)] == list(colours.values())
  taken = [*palette.FIXED_COLORS.values(), *palette.RESERVED_COLORS]
  for name, colour in colours.items():
    assert all(0 <= c <= 1 for c in colour)
    assert palette.canonical(name) is None
    gap = min(math.dist(colour, t) for t in taken)
    assert gap >= palette.MIN_DISTANCE - 1e-9, (name, colour, gap)
  for a, b in itertools.combinations(colours, 2):
    assert math.dist(colours[a], colours[b]) > 0.05, (a, b)
  for a, b in itertools.product(names, numbered[:8]):
    assert math.dist(colours[a], colours[b]) >= palette.MIN_NUMBERED_DISTANCE - 1e-9, (a, b)
  # Numbered classes (no names given) are spread far apart.
  for a, b in itertools.combinations(numbered, 2):
    assert math.dist(colours[a], colours[b]) > 0.25, (a, b)


def test_ome_zarr_label_colours_are_the_palettes(tmp_path):
  classes = ("clinker", "mystery", "pore")  # not the phantom's order
  root = str(tmp_path / "vol.zarr")
  rng = np.random.default_rng(0)
  with volume.create_volume(
    root, shape=(2, 32, 32), dtype="uint16", channels=("ICE",), classes=classes,
    voxel_size_nm=(50, 25, 25),
  ) as w:  # fmt: skip
    for z in range(2):
      labels = rng.integers(0, 3, (32, 32)).astype(np.uint8) if z == 1 else None
      w.write_slice(z, rng.integers(0, 60000, (32, 32, 1)).astype(np.uint16), labels)
    w.commit()
  path = os.path.join(root, ome.VIEW, "labels", ome.ANNOTATIONS, "zarr.json")
  with open(path) as f:
    image_label = json.load(f)["attributes"]["ome"]["image-label"]
  rgba = {c["label-value"]: c["rgba"] for c in image_label["colors"]}
  names = {p["label-value"]: p["class"] for p in image_label["properties"]}
  assert rgba[ome.NOT_LABELLED][3] == 0
  for i, name in enumerate(classes):
    value = i + ome.LABEL_OFFSET
    assert names[value] == name
    expected = [round(255 * c) for c in palette.class_color(name)]
    assert rgba[value] == [*expected, 255], name
  # The same attributes for a segmentation of the classes in another order.
  pyr = ome.pyramid((2, 32, 32), (50, 25, 25))
  colors = ome.label_attributes(pyr, name="seg", classes=("pore", "clinker"))["ome"]
  colors = {c["label-value"]: c["rgba"][:3] for c in colors["image-label"]["colors"]}
  assert colors[2] == rgba[1][:3]  # clinker


# --- lengths, scale bars and ticks --------------------------------------------------------


@pytest.mark.parametrize(
  ("width_px", "pixel_nm", "length_nm", "label"),
  [
    (384, 25, 2000, "2 µm"),
    (512, 25, 2000, "2 µm"),
    (1024, 5, 1000, "1 µm"),
    (500, 5, 500, "500 nm"),
    (100, 1, 20, "20 nm"),
    (4096, 50, 50000, "50 µm"),
    (640, 12.5, 2000, "2 µm"),
  ],
)
def test_scale_bar_length_is_a_round_fifth_of_the_width(width_px, pixel_nm, length_nm, label):
  length = palette.scale_bar_length_nm(width_px, pixel_nm)
  assert length == pytest.approx(length_nm)
  assert palette.format_length(length) == label
  mantissa = length / 10 ** math.floor(math.log10(length))
  assert round(mantissa, 6) in (1, 2, 5)
  assert 0.1 <= length / (width_px * pixel_nm) <= 0.35
  with pytest.raises(ValueError, match="positive"):
    palette.scale_bar_length_nm(100, 0)


def test_plain_numbers_and_log_ticks():
  assert [palette.plain_number(v) for v in (2000, 0.05, 1.5, 10)] == ["2000", "0.05", "1.5", "10"]
  assert palette.plain_number(524.404, digits=3) == "524"
  assert palette.log_ticks(47, 750) == [50, 100, 200, 300, 500]
  wide = palette.log_ticks(1, 1e9, 7)
  assert 2 <= len(wide) <= 7 and wide[0] == 1
  narrow = palette.log_ticks(120, 180)
  assert len(narrow) >= 2 and all(120 <= t <= 180 for t in narrow)


def test_slice_figure_has_a_scale_bar_and_names_stack_and_slice(tmp_path, drawn):
  rng = np.random.default_rng(0)
  truth = rng.integers(0, 3, (384, 384)).astype(np.uint8)
  truth[:20] = 255
  path = tmp_path / "slice_0007.png"
  figures.slice_figure(
    path, z=7, images={"ICE": rng.uniform(-1, 1, truth.shape)}, truth=truth,
    prediction=truth, classes=("pore", "csh", "clinker"), title="mean IoU 1.0000",
    stack="demo/vol.zarr", voxel_size_nm=(50, 25, 25),
  )  # fmt: skip
  assert path.exists()
  fig = drawn[-1]
  bars = scale_bars(fig.axes[0])
  assert len(bars) == 1 and bar_label(bars[0]) == "2 µm"
  assert bars[0].fibseg_length_nm == 2000
  title = fig._suptitle.get_text()
  assert "demo/vol.zarr" in title and "slice 7" in title and "mean IoU" in title
  # The truth panel is painted in the palette's clinker colour.
  truth_panel = fig.axes[1].images[0].get_array()
  clinker = np.asarray(palette.class_color("clinker"))
  assert np.all(np.isclose(truth_panel[truth == 2], clinker).all(-1))
  # Without a voxel size there is no bar to draw (rather than a wrong one).
  figures.slice_figure(
    tmp_path / "x.png", z=7, images={}, truth=truth, prediction=truth,
    classes=("pore", "csh", "clinker"),
  )  # fmt: skip
  assert not scale_bars(drawn[-1].axes[0])


def test_synthetic_preview_has_a_scale_bar_and_names_the_stack(tmp_path, drawn):
  stack = synth.generate(synth.SynthConfig(shape=(3, 64, 96), seed=4))
  synth.save_preview(stack, 1, tmp_path / "preview.png")
  fig = drawn[-1]
  bars = scale_bars(fig.axes[0])
  assert len(bars) == 1 and bar_label(bars[0]) == "500 nm"  # 96 px at 25 nm
  title = fig._suptitle.get_text()
  assert "seed 4" in title and "slice 1" in title and "50 x 25 x 25 nm" in title


def _uncertainty_array(path, values, source):
  run = {"source": source, "voxel_size_nm": [40.0, 10.0, 10.0]}
  spec = {
    "driver": "zarr3",
    "kvstore": {"driver": "file", "path": str(path)},
    "metadata": {
      "shape": list(values.shape),
      "data_type": "uint8",
      "attributes": {"fibseg_segmentation": {"kind": "uncertainty", "run": run}},
    },
    "create": True,
  }
  ts.open(spec).result().write(values).result()
  return str(path)


def test_suggest_figures_have_titles_and_a_scale_bar(tmp_path, drawn):
  values = np.random.default_rng(0).integers(0, 255, (5, 200, 300)).astype(np.uint8)
  unc = _uncertainty_array(tmp_path / "unc.zarr", values, "/data/run7/cement_A.zarr")
  uncertainty.suggest(unc, tmp_path / "suggest", annotated=[1], top=2, kind="uncertainty")
  profile, maps = drawn[-2:]
  assert "cement_A.zarr" in profile._suptitle.get_text()
  assert "cement_A.zarr" in maps._suptitle.get_text()
  bars = scale_bars(maps.axes[0])
  assert len(bars) == 1 and bar_label(bars[0]) == "500 nm"  # 300 px at 10 nm
  assert any("depth" in ax.get_xlabel() for ax in profile.axes[0].child_axes)


def _sized_quantification():
  """A pore phase whose thickness runs from a few hundred nm to microns."""
  rng = np.random.default_rng(3)
  shape = (12, 96, 96)
  labels = np.ones(shape, np.uint8)
  zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
  for _ in range(20):
    z, y, x = rng.integers(0, shape)
    r = rng.integers(1, 16)
    labels[((yy - y) ** 2 + (xx - x) ** 2 <= r * r) & (abs(zz - z) <= 6)] = 0
  return quantify.quantify(labels, ("pore", "solid"), (200, 100, 100), sizes_for=(0,))


def test_pore_size_ticks_are_plain_lengths_that_do_not_overlap(tmp_path, drawn):
  structure = _sized_quantification()
  largest = structure.phases[0].sizes.diameters_nm.max()
  assert largest > 2000  # the axis is then in µm
  figures.pore_size_figure(tmp_path / "pores.png", structure=structure, stack="vol.zarr")
  fig = drawn[-1]
  ax = fig.axes[0]
  assert ax.get_xlabel() == "local thickness (diameter, µm)"
  renderer = draw(fig)
  labels = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
  assert 2 <= len(labels) <= figures.MAX_SIZE_TICKS
  for t in labels:
    assert not any(s in t.get_text() for s in ("10^", "e", "times", "$")), t.get_text()
    float(t.get_text())
  boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
  for left, right in itertools.pairwise(boxes):
    assert left.x1 < right.x0, "tick labels overlap"
  assert "vol.zarr" in ax.get_title()
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert legend[0].startswith("pore: d10 / d50 / d90 = ") and legend[0].endswith(" µm")


def test_structure_and_fraction_figures_colour_classes_by_name(tmp_path, drawn):
  classes = ("clinker", "pore", "csh")
  labels = np.random.default_rng(0).integers(0, 3, (4, 24, 24)).astype(np.uint8)
  structure = quantify.quantify(labels, classes, (50, 25, 25))
  figures.structure_figure(tmp_path / "s.png", structure=structure, stack="stack B")
  bars = drawn[-1].axes[0].patches
  np.testing.assert_allclose(bars[0].get_facecolor()[:3], palette.class_color("clinker"))
  assert any("stack B" in t for t in texts(drawn[-1]))
  fractions = np.full((4, 3), 1 / 3)
  figures.fractions_figure(
    tmp_path / "f.png", z=range(4), fractions=fractions, classes=classes, stack="stack B"
  )
  lines = {line.get_label(): line.get_color() for line in drawn[-1].axes[0].lines}
  np.testing.assert_allclose(lines["clinker"], palette.class_color("clinker"))
  assert "stack B" in drawn[-1]._suptitle.get_text()


def test_training_curves_name_the_run_and_colour_classes_by_name(tmp_path, drawn):
  workdir = tmp_path / "run_3"
  workdir.mkdir()
  with open(workdir / metrics_writer.METRICS_FILE, "w") as f:
    for step in (1, 2):
      row = {"step": step, "loss": 1.0 / step, "val_loss": 1.2 / step, "val_miou": 0.5}
      row.update({"val_iou/clinker": 0.4, "val_iou/pore": 0.6})
      f.write(json.dumps(row) + "\n")
  config = {
    "model": {"name": "sensor3d"},
    "data": {"path": "/data/cement_B.zarr", "channels": "ICE,TLD", "slices": 3},
  }
  # The config saved with the latest checkpoint, where train's loop leaves it.
  os.makedirs(workdir / "checkpoints" / "2" / "config")
  with open(workdir / "checkpoints" / "2" / "config" / "metadata", "w") as f:
    json.dump(config, f)
  out = metrics_writer.plot_curves(str(workdir))
  assert out == str(workdir / metrics_writer.CURVES_FILE) and os.path.exists(out)
  fig = drawn[-1]
  title = fig._suptitle.get_text()
  assert "sensor3d" in title and "ICE + TLD" in title and "cement_B.zarr" in title
  assert "3 slices" in title
  lines = {line.get_label(): line.get_color() for line in fig.axes[1].lines}
  np.testing.assert_allclose(lines["clinker"], palette.class_color("clinker"))
  np.testing.assert_allclose(lines["pore"], palette.class_color("pore"))
  # No powers of ten on the log loss axis.
  draw(fig)
  for t in fig.axes[0].get_yticklabels():
    assert "$" not in t.get_text() and "10^" not in t.get_text()
  # Without a config it still says which run.
  os.remove(workdir / "checkpoints" / "2" / "config" / "metadata")
  metrics_writer.plot_curves(str(workdir))
  assert "run_3" in drawn[-1]._suptitle.get_text()


def test_training_curves_smooth_the_loss_mark_each_validation_and_name_the_loss(tmp_path, drawn):
  workdir = tmp_path / "run"
  workdir.mkdir()
  rng = np.random.default_rng(0)
  with open(workdir / metrics_writer.METRICS_FILE, "w") as f:
    for step in range(20, 1001, 20):  # a noisy loss, one batch spiking
      loss = 1.0 / (1 + step / 200) * (1 + 0.3 * rng.random()) + (1.5 if step == 400 else 0)
      f.write(json.dumps({"step": step, "loss": loss}) + "\n")
      if step % 100 == 0:
        val = {"step": step, "val_loss": 0.5, "val_miou": 0.6, "val_iou/pore": 0.7}
        f.write(json.dumps({**val, "val_iou/csh": 0.5}) + "\n")
  forest = {
    "model": {"name": "unet"},
    "data": {"path": "vol.zarr", "classes": ["pore", "csh"]},
    "train": {"dice_weight": 1.0, "class_weights": True},
    "distill": {"teacher": "forest", "weight": 1.0},
  }
  metrics_writer.plot_curves(str(workdir), settings=config_lib.parse(forest))
  ax_loss, ax_iou = drawn[-1].axes[:2]
  lines = {line.get_label(): line for line in ax_loss.lines}
  raw, smoothed = lines["train loss (each logged step)"], lines["train loss, smoothed"]
  assert raw.get_alpha() < 0.5 and len(raw.get_xdata()) == 50
  assert np.ptp(np.diff(smoothed.get_ydata())) < 0.5 * np.ptp(np.diff(raw.get_ydata()))
  assert max(smoothed.get_ydata()) < 1.5  # the spike is not the curve
  # Every validation, on every validation curve, is a marker.
  val_lines = [lines[k] for k in lines if k.startswith("validation loss")] + ax_iou.lines
  for line in val_lines:
    assert line.get_marker() not in (None, "None", "")
    assert list(line.get_xdata()) == list(range(100, 1001, 100))
  # The axis names the loss trained: with a forest teacher, not the supervised one alone.
  ylabel = ax_loss.get_ylabel().replace("\n", " ")
  assert "soft cross-entropy to a random forest's probabilities" in ylabel
  assert "validation loss (class-weighted cross-entropy + Dice)" in lines
  metrics_writer.plot_curves(str(workdir), settings=config_lib.parse({**forest, "distill": {}}))
  ylabel = drawn[-1].axes[0].get_ylabel().replace("\n", " ")
  assert ylabel == "loss: class-weighted cross-entropy + Dice"
  plain = config_lib.parse({"train": {"dice_weight": 0, "class_weights": False}})
  assert metrics_writer.loss_names(plain) == (
    "cross-entropy",
    "cross-entropy",
  )
  semi = {"semi": {"weight": 0.5, "mode": "soft"}, "train": {"deep_supervision": True}}
  assert metrics_writer.loss_names(config_lib.parse(semi))[0] == (
    "class-weighted cross-entropy + Dice, deep-supervised + 0.5 x soft consistency (unlabelled)"
  )


def test_structure_figure_stars_percolation_the_box_is_too_thin_for(tmp_path, drawn):
  z, y, x = np.indices((4, 48, 48))
  labels = np.where((y - 24) ** 2 + (x - 24) ** 2 <= 64, 0, 1).astype(np.uint8)  # a rod along z
  thin = quantify.quantify(labels, ("pore", "solid"), (30, 10, 10))
  assert thin.phases[0].connectivity.percolates[0] and thin.phases[0].caveats
  figures.structure_figure(tmp_path / "s.png", structure=thin, stack="thin")
  words = texts(drawn[-1]) + [t.get_text() for t in drawn[-1].texts]
  assert any(t.startswith("percolates z") and t.endswith("*") for t in words), words
  assert any(t.startswith("* percolation across a box under 3x") for t in words), words
