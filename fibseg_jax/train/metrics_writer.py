"""Training metrics: JSON lines, TensorBoard event files and a PNG of the curves.

Only process 0 writes. `metrics.jsonl` holds one JSON object per line with "step" and
the metric names; on resume, lines past the restored step (written by the run that
crashed after its last checkpoint) are dropped so the file tells one consistent story.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"


class MetricWriter:
  """Appends metrics to workdir/metrics.jsonl and TensorBoard events under workdir/tb."""

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    _truncate_after(self.path, resume_step)
    from tensorboardX import SummaryWriter  # noqa: PLC0415 - heavy import, writer only

    self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step or None)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: _to_float(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and v is not None and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _to_float(v) -> float | None:
  v = float(np.asarray(v))
  return v if math.isfinite(v) else None


def _truncate_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  rows = read_metrics(path)
  kept = [r for r in rows if r["step"] <= step]
  if len(kept) != len(rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
  """Rows of a metrics.jsonl; a torn last line (crash mid-write) is skipped."""
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def plot_curves(workdir: str, out: str | None = None) -> str | None:
  """Plots training loss, validation loss and IoU against step; returns the PNG path."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return None
  rows = read_metrics(path)
  from matplotlib.figure import Figure  # noqa: PLC0415 - only when plotting

  def series(key):
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else None

  fig = Figure(figsize=(11, 4))
  ax_loss, ax_iou = fig.subplots(1, 2)
  for key, label in (("loss", "train loss"), ("val_loss", "validation loss")):
    s = series(key)
    if s:
      ax_loss.plot(*s, label=label, marker="o" if key == "val_loss" else None)
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("loss (cross-entropy + Dice)")
  ax_loss.set_yscale("log")
  ax_loss.legend()
  ax_loss.grid(alpha=0.3)
  iou_keys = sorted({k for r in rows for k in r if k.startswith("val_iou/")})
  for key in iou_keys:
    s = series(key)
    if s:
      ax_iou.plot(*s, label=key.split("/", 1)[1], alpha=0.7)
  s = series("val_miou")
  if s:
    ax_iou.plot(*s, label="mean IoU", color="black", linewidth=2, marker="o")
  ax_iou.set_xlabel("step")
  ax_iou.set_ylabel("validation IoU")
  ax_iou.set_ylim(0, 1)
  ax_iou.legend(fontsize=8)
  ax_iou.grid(alpha=0.3)
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  out = out or os.path.join(workdir, CURVES_FILE)
  fig.savefig(out, dpi=100)
  return out
