"""The fibseg dock widget: paint a few slices, train, preview, correct, segment, quantify.

Plugins > fibseg_jax > Segment with fibseg (or `FibsegWidget(viewer)` from Python). Each
button calls one `Session` method; the long ones run in napari worker threads, so the
viewer stays responsive, and library errors appear as napari notifications with the
command line's one-line messages. The five steps:

1. **Open** a volume (`fibseg ingest` or `make-synthetic` wrote it), or **Ingest** a
   folder of TIFFs (one subfolder per channel). Its channels and an `annotations`
   Labels layer appear at the voxel size's scale.
2. **Paint** classes on any slices in `annotations` (0 = not painted; label 1 is the
   first class). **Save labels** writes the changed slices into the volume.
3. **Train** (saves first): progress and the validation curve live; **Cancel** stops
   after the step in flight with a checkpoint, and Train resumes it. Training again
   after a finished run refines it in the next run folder.
4. **Preview** segments the current slice (and its uncertainty) in seconds; correct the
   labels where it is wrong and train again. **Preview from strokes** (saves first) needs
   no training: a random forest fitted on the painted pixels, corrected by the prior
   (`Session.prior_dir`: $FIBSEG_PRIOR or the shipped one). **Segment stack** segments
   every slice out of core and adds `segmentation` and `uncertainty` layers.
5. **Next slice** jumps to the slice the ranking suggests annotating; **Quantify**
   shows the per-phase table and saves quantify.md beside the segmentation.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
  QCheckBox,
  QComboBox,
  QFormLayout,
  QGroupBox,
  QHBoxLayout,
  QLabel,
  QLineEdit,
  QProgressBar,
  QPushButton,
  QSpinBox,
  QTableWidget,
  QTableWidgetItem,
  QVBoxLayout,
  QWidget,
)

from fibseg_jax import configs
from fibseg_jax.napari import layers as layers_lib
from fibseg_jax.napari import session as session_lib

PREVIEW, PREVIEW_UNCERTAINTY = "preview", "preview uncertainty"
SEGMENTATION, UNCERTAINTY = "segmentation", "uncertainty"
POLL_MS = 500


def one_line(error: BaseException) -> str:
  """The message a user sees: the library's own one-line wording for user mistakes
  (its error classes are ValueErrors), else the type and message of the bug."""
  if isinstance(error, ValueError | KeyboardInterrupt | OSError):
    return str(error) or type(error).__name__
  return (
    f"{type(error).__name__}: {error} (a bug: please report it with the traceback in the terminal)"
  )


def button(text: str, slot: Callable[[], Any]) -> QPushButton:
  """A push button that calls `slot` when clicked."""
  b = QPushButton(text)
  b.clicked.connect(lambda: slot())
  return b


def row_of(*widgets: QWidget) -> QHBoxLayout:
  """The widgets side by side."""
  row = QHBoxLayout()
  for w in widgets:
    row.addWidget(w)
  return row


class CurveCanvas(QWidget):
  """Training loss and validation mean IoU against the step (matplotlib in Qt)."""

  def __init__(self, parent: QWidget | None = None):
    super().__init__(parent)
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    self.figure = Figure(figsize=(3.2, 1.8), dpi=90, layout="constrained")
    self.canvas = FigureCanvasQTAgg(self.figure)
    self.loss_ax = self.figure.add_subplot(111)
    self.iou_ax = self.loss_ax.twinx()
    layout = QVBoxLayout(self)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(self.canvas)
    self.points = 0
    self.show_curve({"step": [], "loss": [], "val_step": [], "val_miou": []})

  def show_curve(self, curve: dict[str, list[float]]) -> None:
    self.points = len(curve["step"]) + len(curve["val_step"])
    for ax in (self.loss_ax, self.iou_ax):
      ax.clear()
    self.loss_ax.plot(curve["step"], curve["loss"], color="tab:blue", lw=1)
    self.loss_ax.set_ylabel("train loss", color="tab:blue", fontsize=8)
    self.iou_ax.plot(curve["val_step"], curve["val_miou"], "o-", color="tab:orange", ms=3)
    self.iou_ax.set_ylabel("val mean IoU", color="tab:orange", fontsize=8)
    self.iou_ax.set_ylim(0, 1)
    self.loss_ax.set_xlabel("step", fontsize=8)
    for ax in (self.loss_ax, self.iou_ax):
      ax.tick_params(labelsize=7)
    self.canvas.draw_idle()


class WorkerStop(threading.Event):
  """Cancel for a library loop (`stop=`): set by the Cancel button, or by napari asking
  the worker to quit (closing the viewer), so a quit never waits out a whole run."""

  worker: Any = None

  def is_set(self) -> bool:
    return super().is_set() or bool(self.worker is not None and self.worker.abort_requested)


class FibsegWidget(QWidget):
  """The dock widget (see the module docstring)."""

  def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
    super().__init__(parent)
    self.viewer = napari_viewer
    self.session: session_lib.Session | None = None
    self.workdir: str | None = None
    self.worker = None
    self.stop: threading.Event | None = None
    self.last_error: str | None = None
    self.segmenting: str | None = None  # the output folder being segmented
    self.training: str | None = None  # the run folder being trained
    self.timer = QTimer(self)
    self.timer.setInterval(POLL_MS)
    self.timer.timeout.connect(self._poll)

    layout = QVBoxLayout(self)
    # 1. volume
    box = QGroupBox("1. Volume")
    form = QFormLayout(box)
    self.volume_edit = QLineEdit()
    self.volume_edit.setPlaceholderText("path/to/volume.zarr")
    self.open_button = button("Open", lambda: self.open_volume(self.volume_edit.text()))
    form.addRow("Volume", row_of(self.volume_edit, self.open_button))
    self.folder_edit = QLineEdit()
    self.folder_edit.setPlaceholderText("folder with ICE/, TLD/ (and labels/) of TIFFs")
    self.classes_edit = QLineEdit()
    self.classes_edit.setPlaceholderText("pore,solid")
    self.voxel_edit = QLineEdit("50,25,25")
    self.ingest_button = button("Ingest", self.ingest)
    form.addRow("or TIFFs", row_of(self.folder_edit, self.ingest_button))
    form.addRow("Classes", self.classes_edit)
    form.addRow("Voxel z,y,x nm", self.voxel_edit)
    layout.addWidget(box)
    # 2. labels
    box = QGroupBox("2. Paint in 'annotations' (0 = not painted)")
    self.save_button = button("Save labels", self.save_labels)
    box.setLayout(row_of(self.save_button))
    layout.addWidget(box)
    # 3. training
    box = QGroupBox("3. Train")
    form = QFormLayout(box)
    self.model_box = QComboBox()
    self.model_box.addItems(configs.names())
    self.model_box.setCurrentText("unet")
    self.channels_edit = QLineEdit()
    self.channels_edit.setPlaceholderText("all channels")
    self.slices_spin = QSpinBox()
    self.slices_spin.setRange(1, 15)
    self.slices_spin.setSingleStep(2)
    self.slices_spin.setValue(3)
    self.steps_spin = QSpinBox()
    self.steps_spin.setRange(1, 1_000_000)
    self.steps_spin.setValue(400)
    self.forest_check = QCheckBox("also learn from a random forest (for brush strokes)")
    self.forest_check.setToolTip(
      "A forest fitted on the painted pixels labels every slice and the network learns its "
      "probabilities too (--config.distill.teacher=forest); see README, Annotating less"
    )
    self.more_edit = QLineEdit()
    self.more_edit.setPlaceholderText("e.g. train.batch_size=4 model.features=(16,16,32,64,128,16)")
    for label, w in (
      ("Model", self.model_box),
      ("Channels", self.channels_edit),
      ("Slices", self.slices_spin),
      ("Steps", self.steps_spin),
      ("Strokes", self.forest_check),
      ("More settings", self.more_edit),
    ):
      form.addRow(label, w)
    self.train_button = button("Train", self.train)
    self.cancel_button = button("Cancel", self.cancel)
    self.cancel_button.setEnabled(False)
    form.addRow(row_of(self.train_button, self.cancel_button))
    self.progress = QProgressBar()
    form.addRow(self.progress)
    self.curve = CurveCanvas()
    form.addRow(self.curve)
    layout.addWidget(box)
    # 4. segmentation
    box = QGroupBox("4. Segment")
    self.preview_button = button("Preview slice", self.preview)
    self.strokes_button = button("Preview from strokes", self.preview_from_strokes)
    self.strokes_button.setToolTip(
      "No training: a random forest fitted on the painted pixels, corrected by the prior "
      "trained once on synthetic FIB-SEM (saves the labels first)"
    )
    self.segment_button = button("Segment stack", self.segment)
    box.setLayout(row_of(self.preview_button, self.strokes_button, self.segment_button))
    layout.addWidget(box)
    # 5. what next
    box = QGroupBox("5. Next")
    column = QVBoxLayout(box)
    self.next_button = button("Next slice", self.next_slice)
    self.quantify_button = button("Quantify", self.quantify)
    column.addLayout(row_of(self.next_button, self.quantify_button))
    self.table = QTableWidget(0, len(session_lib.COLUMNS))
    self.table.setMinimumHeight(160)
    self.table.setHorizontalHeaderLabels([title for _, title in session_lib.COLUMNS])
    column.addWidget(self.table)
    layout.addWidget(box)
    self.status = QLabel("Open a volume to begin.")
    self.status.setWordWrap(True)
    layout.addWidget(self.status)
    layout.addStretch()
    self.action_buttons = (
      self.open_button,
      self.ingest_button,
      self.save_button,
      self.train_button,
      self.preview_button,
      self.strokes_button,
      self.segment_button,
      self.next_button,
      self.quantify_button,
    )

  # --- plumbing -----------------------------------------------------------------------

  def _say(self, text: str) -> None:
    self.status.setText(text)
    show_info(text)

  def _error(self, error: BaseException) -> None:
    self.last_error = one_line(error)
    if not isinstance(error, ValueError | KeyboardInterrupt | OSError):
      traceback.print_exception(error)
    self.status.setText(f"error: {self.last_error}")
    show_error(self.last_error)

  def _guard(self, fn: Callable[[], Any]) -> Any:
    """Runs a quick action in the GUI thread with the same error handling."""
    try:
      return fn()
    except Exception as e:  # noqa: BLE001 - every error becomes a notification
      self._error(e)
      return None

  def _start(self, fn: Callable[..., Any], done: Callable[[Any], None], *, stoppable: bool = False):
    """Runs fn in a worker thread; `done` gets its result in the GUI thread, an error
    becomes one notification (`_error`)."""
    for b in self.action_buttons:
      b.setEnabled(False)
    self.cancel_button.setEnabled(stoppable)
    stop = WorkerStop() if stoppable else None
    self.stop = stop

    def work():
      try:
        return fn()
      except KeyboardInterrupt as e:  # a stop the action did not word: still one line
        raise session_lib.SessionError(str(e) or "stopped") from None

    worker = create_worker(work, _start_thread=False, _ignore_errors=True)
    if stop is not None:
      stop.worker = worker  # napari quitting asks the worker to quit: stop there too
    worker.returned.connect(done)
    worker.errored.connect(self._error)
    worker.finished.connect(self._finished)
    self.worker = worker
    worker.start()
    return worker

  def _start_with_session(self, fn: Callable[[session_lib.Session], Any], done) -> None:
    """`_start(fn(session), done)`, or the error notification when no volume is open."""
    session = self._guard(self._need_session)
    if session is not None:
      self._start(lambda: fn(session), done)

  def _finished(self) -> None:
    self.worker = None
    if self.timer.isActive():
      self.timer.stop()
      self._poll()  # the last steps or blocks
    self.segmenting = self.training = None
    for b in self.action_buttons:
      b.setEnabled(True)
    self.cancel_button.setEnabled(False)

  def busy(self) -> bool:
    return self.worker is not None

  def _need_session(self) -> session_lib.Session:
    if self.session is None and layers_lib.ANNOTATIONS in self.viewer.layers:
      # A volume opened by the reader (`napari --plugin fibseg_jax vol.zarr`).
      root = self.viewer.layers[layers_lib.ANNOTATIONS].metadata.get("fibseg_volume")
      if root:
        self.session = session_lib.Session(root)
        self.volume_edit.setText(root)
    if self.session is None:
      raise session_lib.SessionError("Volume: open a volume first")
    return self.session

  def _replace_layers(self, data: list[tuple[Any, dict[str, Any], str]]) -> None:
    for array, kwargs, kind in data:
      if kwargs["name"] in self.viewer.layers:
        self.viewer.layers.remove(kwargs["name"])
      getattr(self.viewer, f"add_{kind}")(array, **kwargs)

  # --- 1. volume ----------------------------------------------------------------------

  def open_volume(self, path: str) -> None:
    def do():
      if not path.strip():
        raise session_lib.SessionError("Volume: give the path of a volume (.zarr)")
      self.session = session_lib.Session(path.strip())
      self.workdir = None
      for name in (PREVIEW, PREVIEW_UNCERTAINTY, SEGMENTATION, UNCERTAINTY):
        if name in self.viewer.layers:  # of the volume open before
          self.viewer.layers.remove(name)
      self.volume_edit.setText(self.session.root)
      data = layers_lib.volume_layers(self.session.root)
      if layers_lib.ANNOTATIONS in self.viewer.layers:
        mine = self.viewer.layers[layers_lib.ANNOTATIONS].metadata.get("fibseg_volume")
        if mine and os.path.realpath(mine) == os.path.realpath(self.session.root):
          data = [d for d in data if d[1]["name"] != layers_lib.ANNOTATIONS]  # keep unsaved paint
      self._replace_layers(data)
      meta = self.session.volume.metadata
      classes = ", ".join(f"{i + 1} = {c}" for i, c in enumerate(meta.classes))
      self._say(
        f"{self.session.root}: {meta.shape[0]} slices (numbered {meta.numbering.describe()}, "
        f"as their files; napari's slider counts z from 0) of {meta.shape[1]} x {meta.shape[2]}, "
        f"channels {', '.join(meta.channels)}; paint {classes}"
      )

    self._guard(do)

  def ingest(self) -> None:
    folder = self.folder_edit.text().strip()
    classes = [c.strip() for c in self.classes_edit.text().split(",") if c.strip()]
    voxel_text = self.voxel_edit.text()

    def work():
      try:
        voxel = [float(v) for v in voxel_text.split(",")]
      except ValueError:
        voxel = []
      if len(voxel) != 3 or min(voxel) <= 0:
        raise session_lib.SessionError(
          f"Voxel z,y,x nm: {voxel_text!r}; expected three positive numbers, e.g. 50,25,25"
        )
      return session_lib.ingest_folder(folder, classes=classes, voxel_size_nm=voxel)

    self._start(work, self.open_volume)

  # --- 2. labels ----------------------------------------------------------------------

  def save_labels(self) -> list[int] | None:
    def do():
      session = self._need_session()
      if layers_lib.ANNOTATIONS not in self.viewer.layers:
        raise session_lib.SessionError(
          f"no '{layers_lib.ANNOTATIONS}' layer to save: Open the volume again to get it back"
        )
      layer = self.viewer.layers[layers_lib.ANNOTATIONS]
      changed = session.save_painted(np.asarray(layer.data))
      meta = session.volume.metadata
      done = f"saved slices {_slices_text(meta, changed)}" if changed else "labels unchanged"
      self._say(f"{done}; annotated: {_slices_text(meta, meta.annotated_slices)}")
      return changed

    return self._guard(do)

  # --- 3. training --------------------------------------------------------------------

  def choice(self) -> session_lib.TrainChoice:
    channels = tuple(c.strip() for c in self.channels_edit.text().split(",") if c.strip())
    return session_lib.TrainChoice(
      model=self.model_box.currentText(),
      channels=channels,
      slices=self.slices_spin.value(),
      steps=self.steps_spin.value(),
      overrides=self.more_edit.text(),
      forest_teacher=self.forest_check.isChecked(),
    )

  def train(self) -> None:
    if self.save_labels() is None:
      return
    session, choice = self.session, self.choice()
    plan = self._guard(lambda: session.plan(choice))
    if plan is None:
      return
    _, self.training = plan
    self.progress.setRange(0, choice.steps)
    self.progress.setValue(0)
    self._say(f"training {choice.model} in {self.training}")
    self._start(lambda: session.train(choice, self.stop, plan=plan), self._trained, stoppable=True)
    self.timer.start()

  def _trained(self, result: tuple[str, dict[str, Any] | None]) -> None:
    workdir, summary = result
    self.workdir = workdir
    if summary is None:
      self._say(f"cancelled: checkpoint saved in {workdir}; Train resumes it")
    else:
      best = summary["best"]
      score = f", val mean IoU {best['val_miou']:.3f}" if best.get("val_miou") is not None else ""
      self._say(f"trained {workdir}: best step {best['step']}{score}")

  def cancel(self) -> None:
    if self.stop is not None:
      self.stop.set()
      self.status.setText("stopping after the step in flight ...")

  def _poll(self) -> None:
    if self.segmenting:
      done, _ = self.session.progress_of(self.segmenting)
      self.progress.setValue(done)
      return
    if not self.training:
      return
    curve = session_lib.Session.curve(self.training)
    if curve["step"]:
      self.progress.setValue(int(curve["step"][-1]))
    if len(curve["step"]) + len(curve["val_step"]) != self.curve.points:
      self.curve.show_curve(curve)

  # --- 4. segmentation ----------------------------------------------------------------

  def current_slice(self) -> int:
    return int(self.viewer.dims.current_step[0])

  def preview(self) -> None:
    z = self.current_slice()
    self._start_with_session(lambda s: (z, *s.preview(z, self.workdir)), self._previewed)

  def _previewed(self, result: tuple[int, np.ndarray, np.ndarray]) -> None:
    z, labels, uncertainty = result
    self._show_preview(z, labels, uncertainty)
    self._say(
      f"preview of slice {_slices_text(self.session.volume.metadata, [z])}: mean uncertainty "
      f"{float(uncertainty.mean()):.3f}"
    )

  def preview_from_strokes(self) -> None:
    if self.save_labels() is None:  # the paint on screen is what the forest fits
      return
    z = self.current_slice()
    channels = self.choice().channels or None

    def work(session: session_lib.Session) -> tuple[int, np.ndarray, np.ndarray, float]:
      start = time.perf_counter()
      labels, uncertainty = session.preview_from_strokes(z, channels)
      return z, labels, uncertainty, time.perf_counter() - start

    self._say(
      f"preview of slice {_slices_text(self.session.volume.metadata, [z])} from strokes ..."
    )
    self._start_with_session(work, self._previewed_from_strokes)

  def _previewed_from_strokes(self, result: tuple[int, np.ndarray, np.ndarray, float]) -> None:
    z, labels, uncertainty, seconds = result
    self._show_preview(z, labels, uncertainty)
    self._say(
      f"preview of slice {_slices_text(self.session.volume.metadata, [z])} from the strokes: "
      f"random forest + prior, no training, {seconds:.1f} s; mean uncertainty "
      f"{float(uncertainty.mean()):.3f}"
    )

  def _show_preview(self, z: int, labels: np.ndarray, uncertainty: np.ndarray) -> None:
    """Slice z's labels [y, x] (class + 1) and uncertainty [y, x] (0-1) in the preview layers."""
    meta = self.session.volume.metadata
    scale = tuple(meta.voxel_size_nm)
    # One slice, placed at z: shown on that slice only, one slice of memory.
    translate = (z * scale[0], 0.0, 0.0)
    unc = np.round(255 * uncertainty).astype(np.uint8)[np.newaxis]
    if PREVIEW in self.viewer.layers and PREVIEW_UNCERTAINTY in self.viewer.layers:
      for name, data in ((PREVIEW, labels[np.newaxis]), (PREVIEW_UNCERTAINTY, unc)):
        layer = self.viewer.layers[name]
        layer.data = data
        layer.translate = translate
    else:
      kwargs = layers_lib.label_kwargs(PREVIEW, meta.classes, scale)
      self._replace_layers([(labels[np.newaxis], kwargs, "labels")])
      self.viewer.layers[PREVIEW].translate = translate
      self.viewer.layers[PREVIEW].opacity = 0.5
      kwargs = {
        "name": PREVIEW_UNCERTAINTY,
        "scale": scale,
        "translate": translate,
        "colormap": "inferno",
        "contrast_limits": (0, 255),
        "visible": False,
      }
      self._replace_layers([(unc, kwargs, "image")])

  def segment(self) -> None:
    session = self._guard(self._need_session)
    if session is None:
      return
    out = self._guard(lambda: session.output_dir(session.resolve_run(self.workdir)))
    if out is None:
      return
    self.segmenting = out
    done, total = session.progress_of(out)
    self.progress.setRange(0, total)
    self.progress.setValue(done)
    self.progress.setValue(0)
    self._say("segmenting the stack ...")
    self._start(lambda: session.segment(self.workdir, self.stop), self._segmented, stoppable=True)
    self.timer.start()

  def _segmented(self, result: Any) -> None:
    if result is None:
      self._say("segmentation stopped: the blocks done are kept; Segment stack resumes it")
      return
    out = os.path.dirname(result.output)
    scale = self.session.volume.metadata.voxel_size_nm
    self._replace_layers(layers_lib.segmentation_layers(result.output, SEGMENTATION, scale))
    self.viewer.layers[SEGMENTATION].editable = False  # read from its zarr store
    unc = layers_lib.segmentation_layers(result.uncertainty, UNCERTAINTY, scale)
    unc[0][1]["visible"] = False
    self._replace_layers(unc)
    if result.blocks_done:
      self._say(f"segmented {result.mpixels:.1f} Mpixel in {result.seconds:.0f} s -> {out}")
    else:
      self._say(f"this checkpoint's segmentation is complete already: {out}")

  # --- 5. next --------------------------------------------------------------------------

  def next_slice(self) -> None:
    self._start_with_session(lambda s: s.next_slices(self.workdir), self._jump)

  def _jump(self, slices: list[int]) -> None:
    if not slices:
      self._say("no unannotated slice left to suggest")
      return
    self.viewer.dims.set_current_step(0, slices[0])
    meta = self.session.volume.metadata
    self._say(
      f"annotate next: slices {_slices_text(meta, slices)} (showing "
      f"{_slices_text(meta, slices[:1])})"
    )

  def quantify(self) -> None:
    self._start_with_session(lambda s: s.quantify(self.workdir), self._quantified)

  def _quantified(self, result: tuple[list[dict[str, Any]], str]) -> None:
    rows, path = result
    self.table.setRowCount(len(rows))
    for i, row in enumerate(rows):
      for j, (key, _) in enumerate(session_lib.COLUMNS):
        self.table.setItem(i, j, QTableWidgetItem(session_lib.format_cell(row[key])))
    self.table.resizeColumnsToContents()
    self._say(f"quantified; report saved to {path}")


def _slices_text(meta: Any, zs: Any) -> str:
  """Slices as the user numbers them (their files' numbers), with napari's slider
  position (z from 0) beside them where the two differ: '11 (z 10)'."""
  numbering = meta.numbering
  if numbering.is_identity:
    return ", ".join(str(int(z)) for z in zs)
  return ", ".join(f"{numbering.label(z)} (z {int(z)})" for z in zs)
