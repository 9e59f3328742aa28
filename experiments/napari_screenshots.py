r"""Screenshots of the napari widget on the demo stack, for README ("In napari").

  xvfb-run -a .venv/bin/python experiments/napari_screenshots.py --out=docs/napari

Generates the demo's synthetic stack (24 x 384 x 384, ICE + TLD, slices 5, 11, 17
annotated; `fibseg make-synthetic`), opens it in a napari viewer with the fibseg widget,
trains the demo's U-Net for --steps, previews a slice, segments the stack, asks for the
next slice and quantifies, taking a screenshot of the whole window after each step:
1_open.png, 2_train_preview.png, 3_segment_quantify.png. Needs the `napari` extra and a
display (Xvfb here). Takes a few minutes on a laptop CPU.
"""

import os
import shutil
import subprocess
import sys
import time

from absl import app, flags, logging

_OUT = flags.DEFINE_string("out", "docs/napari", "Folder for the screenshots.")
_WORK = flags.DEFINE_string("work", "/tmp/fibseg_napari_shots", "Folder for the stack and runs.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps.")

DEMO = "train.batch_size=8 data.patch=128 model.features=(16,16,32,64,128,16) data.prefetch=2"


def wait(app_, widget) -> None:
  while widget.busy():
    app_.processEvents()
    time.sleep(0.05)
  app_.processEvents()
  if widget.last_error:
    sys.exit(f"error: {widget.last_error}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  import napari  # noqa: PLC0415 - the napari extra
  from PIL import Image  # noqa: PLC0415
  from qtpy.QtWidgets import QApplication  # noqa: PLC0415

  from fibseg_jax.napari.widget import FibsegWidget  # noqa: PLC0415

  os.makedirs(_OUT.value, exist_ok=True)
  # The scratch folder is this script's (its marker says so): start each time afresh.
  marker = os.path.join(_WORK.value, ".fibseg-napari-shots")
  if os.path.exists(_WORK.value) and not os.path.exists(marker):
    sys.exit(f"error: --work={_WORK.value} exists and is not this script's; choose another")
  shutil.rmtree(_WORK.value, ignore_errors=True)
  os.makedirs(_WORK.value)
  open(marker, "w").close()
  volume = os.path.join(_WORK.value, "vol.zarr")
  subprocess.run(
    [sys.executable, "-m", "fibseg_jax.cli", "make-synthetic", f"--out={volume}",
     "--shape=24,384,384", "--seed=0", "--annotate=5,11,17", "--format=zarr"],
    check=True,
  )  # fmt: skip
  viewer = napari.Viewer(show=True)
  viewer.window.resize(1500, 950)
  widget = FibsegWidget(viewer)
  viewer.window.add_dock_widget(widget, name="fibseg", area="right")
  app_ = QApplication.instance()
  widget.open_volume(volume)
  viewer.dims.set_current_step(0, 11)
  ann = viewer.layers["annotations"]
  ann.selected_label = 2
  viewer.layers.selection.active = ann
  app_.processEvents()

  def shot(name: str) -> None:
    from napari._qt.dialogs.qt_notification import NapariQtNotification  # noqa: PLC0415

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
      toast.close()  # the status line under the widget says the same
    app_.processEvents()
    path = os.path.join(_OUT.value, name)
    rgb = viewer.screenshot(canvas_only=False, flash=False)[..., :3]
    Image.fromarray(rgb).quantize(256).save(path, optimize=True)  # a third of the bytes
    print("wrote", path)

  shot("1_open.png")
  widget.steps_spin.setValue(_STEPS.value)
  widget.more_edit.setText(DEMO)
  widget.train()
  wait(app_, widget)
  viewer.dims.set_current_step(0, 8)
  widget.preview()
  wait(app_, widget)
  viewer.layers["annotations"].visible = False
  shot("2_train_preview.png")
  widget.segment()
  wait(app_, widget)
  viewer.layers["preview"].visible = False
  widget.next_slice()
  wait(app_, widget)
  widget.quantify()
  wait(app_, widget)
  shot("3_segment_quantify.png")
  viewer.close()


if __name__ == "__main__":
  app.run(main)
