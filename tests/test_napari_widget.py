"""The napari widget in a real viewer (headless under Xvfb): paint, train, cancel and
resume, preview, preview from strokes, segment, next slice, quantify, and the reader.

Needs the `napari` extra and pytest-qt (`make test` installs both) and an X display:
pytest-xvfb starts Xvfb when it is installed (apt-get install xvfb xauth libgl1-mesa-dri
libegl1 libxkbcommon-x11-0 libxcb-cursor0 ...: see the Makefile); without one, these tests
are skipped with one line saying so.
"""

import os
import re
import shutil
import warnings

import numpy as np
import pytest
from test_train import CLASSES, make_volume

from fibseg_jax import checkpoint
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import enhance

APT = (
  "apt-get install xvfb xauth libdbus-1-3 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 "
  "libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xinput0 "
  "libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libegl1 libgl1-mesa-dri"
)
try:
  with warnings.catch_warnings():  # npe2 still uses pydantic v1 idioms (not ours to fix)
    warnings.simplefilter("ignore", DeprecationWarning)
    import napari.plugins  # noqa: F401 - npe2 and its manifests
    import napari.utils._testsupport  # noqa: F401
  import pytestqt  # noqa: F401
except ImportError:
  pytest.skip(
    "napari tests skipped: pip install -e '.[napari]' pytest-qt pytest-xvfb",
    allow_module_level=True,
  )
if not os.environ.get("DISPLAY") and not shutil.which("Xvfb"):
  pytest.skip(f"napari tests skipped: no X display; {APT}", allow_module_level=True)

with warnings.catch_warnings():  # napari's models: pydantic v1 idioms (not ours to fix)
  warnings.simplefilter("ignore", DeprecationWarning)
  from qtpy.QtCore import Qt

  from fibseg_jax.napari.widget import FibsegWidget

pytest_plugins = ("napari.utils._testsupport",)  # make_napari_viewer (off elsewhere: setup.cfg)


# napari's models still use pydantic v1's json_encoders (a dependency's warning, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:`json_encoders` is deprecated:DeprecationWarning")
TINY = (
  "model.depth=2 model.features=(4,8,8) model.norm=batch data.patch=16 data.val_block=16 "
  "data.prefetch=1 train.batch_size=4"
)
WAIT_MS = 180_000
SCALE = (50.0, 25.0, 25.0)


@pytest.fixture
def widget(make_napari_viewer, tmp_path):
  if not os.environ.get("DISPLAY"):
    pytest.skip(f"napari tests skipped: no X display (pytest-xvfb found no Xvfb); {APT}")
  viewer = make_napari_viewer()
  w = FibsegWidget(viewer)
  viewer.window.add_dock_widget(w, name="fibseg")
  w.open_volume(make_volume(str(tmp_path / "vol.zarr")))
  w.steps_spin.setValue(4)
  w.more_edit.setText(TINY)
  return w


def click_and_wait(qtbot, w, button):
  qtbot.mouseClick(button, Qt.LeftButton)
  qtbot.waitUntil(lambda: not w.busy(), timeout=WAIT_MS)


def test_paint_train_preview_segment_next_quantify(widget, qtbot):
  w, viewer = widget, widget.viewer
  assert [layer.name for layer in viewer.layers] == ["ICE", "TLD", "annotations"]
  for layer in viewer.layers:
    assert tuple(layer.scale) == SCALE
  ann = viewer.layers["annotations"]
  assert ann.metadata["classes"] == list(CLASSES)
  assert ann.get_color(2)[:3] is not None
  # Paint a stroke of class "solid" (value 2) on slice 2 with the layer's brush.
  ann.brush_size = 3
  for x in range(10, 30):
    ann.paint((2, 12, x), 2, refresh=False)
  ann.refresh()

  click_and_wait(qtbot, w, w.train_button)
  assert w.last_error is None, w.last_error
  vol = volume_lib.open_volume(w.session.root)
  assert 2 in vol.metadata.annotated_slices  # Train saved the painting first
  assert (vol.read_labels(2)[12, 10:30] == 1).all()
  assert w.workdir.endswith("run_1") and w.progress.value() == 4 and w.curve.points > 0
  assert "trained" in w.status.text()

  viewer.dims.set_current_step(0, 2)
  click_and_wait(qtbot, w, w.preview_button)
  preview = viewer.layers["preview"]
  assert tuple(preview.scale) == SCALE and preview.metadata["classes"] == list(CLASSES)
  assert preview.data.shape == (1, 48, 48) and preview.translate[0] == 2 * SCALE[0]
  assert preview.data.min() >= 1 and preview.data.max() <= len(CLASSES)

  click_and_wait(qtbot, w, w.segment_button)
  assert w.last_error is None, w.last_error
  assert w.progress.maximum() == 6 and w.progress.value() == 6  # a block a slice, all done
  seg = viewer.layers["segmentation"]
  assert tuple(seg.scale) == SCALE and seg.metadata["classes"] == list(CLASSES)
  values = np.asarray(seg.data[2])
  assert values.shape == (48, 48) and values.min() >= 1 and values.max() <= len(CLASSES)
  assert "uncertainty" in viewer.layers

  click_and_wait(qtbot, w, w.next_button)
  z = viewer.dims.current_step[0]
  assert z not in vol.metadata.annotated_slices and "annotate next" in w.status.text()

  click_and_wait(qtbot, w, w.quantify_button)
  assert w.table.rowCount() == len(CLASSES)
  assert [w.table.item(i, 0).text() for i in range(len(CLASSES))] == list(CLASSES)

  # A user mistake is a notification with the one-line message, and nothing runs.
  w.more_edit.setText("batch")
  click_and_wait(qtbot, w, w.train_button)
  assert "'batch' is not FIELD=VALUE" in w.last_error
  viewer.layers.remove("annotations")
  w.save_labels()
  assert "no 'annotations' layer to save" in w.last_error
  # Opening the volume again brings back its layers, the painting saved, and drops
  # the previews and segmentation of before.
  w.open_volume(w.session.root)
  assert "preview" not in viewer.layers and "segmentation" not in viewer.layers
  assert (viewer.layers["annotations"].data[2, 12, 10:30] == 2).all()


def test_cancel_keeps_a_checkpoint_and_train_resumes(widget, qtbot):
  w = widget
  w.steps_spin.setValue(40)
  qtbot.mouseClick(w.train_button, Qt.LeftButton)
  qtbot.mouseClick(w.cancel_button, Qt.LeftButton)
  qtbot.waitUntil(lambda: not w.busy(), timeout=WAIT_MS)
  assert w.last_error is None, w.last_error
  assert "cancelled" in w.status.text()
  step = checkpoint.latest_step(w.workdir)
  assert step is not None and 1 <= step < 40
  w.steps_spin.setValue(step + 2)
  click_and_wait(qtbot, w, w.train_button)
  assert w.workdir.endswith("run_1")  # resumed, not a new run
  assert checkpoint.latest_step(w.workdir) == step + 2
  # Cancel during Segment stack: stopped, the widget usable again, and Segment resumes.
  qtbot.mouseClick(w.segment_button, Qt.LeftButton)
  qtbot.mouseClick(w.cancel_button, Qt.LeftButton)
  qtbot.waitUntil(lambda: not w.busy(), timeout=WAIT_MS)
  assert w.last_error is None, w.last_error
  assert "segmentation stopped" in w.status.text() and w.segment_button.isEnabled()
  click_and_wait(qtbot, w, w.segment_button)
  assert w.last_error is None and "segmentation" in w.viewer.layers


def test_preview_from_strokes_needs_no_training(make_napari_viewer, tmp_path, qtbot, monkeypatch):
  if not os.environ.get("DISPLAY"):
    pytest.skip(f"napari tests skipped: no X display; {APT}")
  monkeypatch.delenv("FIBSEG_PRIOR", raising=False)  # the shipped prior
  viewer = make_napari_viewer()
  w = FibsegWidget(viewer)
  viewer.window.add_dock_widget(w, name="fibseg")
  w.open_volume(make_volume(str(tmp_path / "vol.zarr"), annotated=()))
  assert w.session.prior_dir == enhance.PRIOR_DIR
  viewer.dims.set_current_step(0, 4)
  # Nothing painted: one line, and no preview.
  click_and_wait(qtbot, w, w.strokes_button)
  assert "preview from strokes: nothing painted" in w.last_error
  assert "preview" not in viewer.layers
  # Strokes on slice 2: a short line through each 8 x 8 block, of the class its ICE
  # level shows (make_volume: ICE = 1000 + 4000 * class + noise).
  ice = w.session.volume.read_image(2)[..., 0].astype(float)
  blocks = ice.reshape(6, 8, 6, 8).mean((1, 3))
  classes = np.clip(np.round((blocks - 1000) / 4000), 0, 2).astype(int)
  assert set(classes.ravel()) == {0, 1, 2}
  ann = viewer.layers["annotations"]
  ann.brush_size = 1
  for (by, bx), c in np.ndenumerate(classes):
    for x in range(bx * 8 + 2, bx * 8 + 6):
      ann.paint((2, by * 8 + 4, x), int(c) + 1, refresh=False)
  ann.refresh()
  w.last_error = None
  click_and_wait(qtbot, w, w.strokes_button)
  assert w.last_error is None, w.last_error
  assert volume_lib.open_volume(w.session.root).metadata.annotated_slices == (2,)  # saved first
  assert not w.workdir and not w.session.run_dirs()  # nothing trained
  preview = viewer.layers["preview"]
  assert preview.data.shape == (1, 48, 48) and preview.translate[0] == 4 * SCALE[0]
  assert preview.data.min() >= 1 and preview.data.max() <= len(CLASSES)
  uncertainty = viewer.layers["preview uncertainty"].data
  assert uncertainty.shape == (1, 48, 48) and uncertainty.max() > 0
  assert "from the strokes: random forest + prior, no training" in w.status.text()
  assert re.search(r"no training, \d+\.\d s;", w.status.text())
  # No prior in the folder: one line naming it, and the preview stays.
  w.session.prior_dir = str(tmp_path / "no_prior")
  click_and_wait(qtbot, w, w.strokes_button)
  assert f"no prior in {tmp_path / 'no_prior'}" in w.last_error
  assert "FIBSEG_PRIOR" in w.last_error and "preview" in viewer.layers
  assert w.strokes_button.isEnabled()


def test_reader_opens_volumes_and_segmentations(make_napari_viewer, tmp_path):
  if not os.environ.get("DISPLAY"):
    pytest.skip(f"napari tests skipped: no X display; {APT}")
  root = make_volume(str(tmp_path / "vol.zarr"))
  viewer = make_napari_viewer()
  # The manifest's widget, as Plugins > Segment with fibseg opens it.
  _, widget = viewer.window.add_plugin_dock_widget("fibseg_jax", "Segment with fibseg")
  assert type(widget).__name__ == "FibsegWidget"
  layers = viewer.open(root, plugin="fibseg_jax")
  assert [layer.name for layer in layers] == ["ICE", "TLD", "annotations"]
  assert tuple(layers[0].scale) == SCALE
  assert layers[0].contrast_limits[1] > layers[0].contrast_limits[0]
  np.testing.assert_array_equal(
    np.asarray(layers[0].data[1]), volume_lib.open_volume(root).read_image(1)[..., 0]
  )
