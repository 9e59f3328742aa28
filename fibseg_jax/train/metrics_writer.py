"""Training metrics: JSON lines, TensorBoard event files and a PNG of the curves.

Only process 0 writes. `metrics.jsonl` holds one JSON object per line with "step" and
the metric names; on resume, lines past the restored step (written by the run that
crashed after its last checkpoint) are dropped so the file tells one consistent story.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Mapping

import numpy as np

from fibseg_jax.data import palette
from fibseg_jax.train import config as config_lib

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


def checkpoint_config(step_dir: str) -> dict | None:
  """The experiment config saved in one checkpoint step directory (the JSON orbax writes
  as <step>/config/metadata), or None when it is missing or unreadable."""
  try:
    with open(os.path.join(step_dir, "config", "metadata")) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return None
  return config if isinstance(config, dict) else None


def saved_config(workdir: str) -> dict | None:
  """The experiment config saved with the workdir's latest checkpoint
  (`checkpoint_config` of checkpoints/<step>), or None when there is none."""
  root = os.path.join(workdir, "checkpoints")
  try:
    steps = sorted((int(s) for s in os.listdir(root) if s.isdigit()), reverse=True)
  except OSError:
    return None
  for step in steps:
    config = checkpoint_config(os.path.join(root, str(step)))
    if config is not None:
      return config
  return None


def saved_settings(workdir: str) -> config_lib.Settings | None:
  """The parsed `saved_config` of a workdir, or None when it has none it can read."""
  config = saved_config(workdir)
  try:
    return None if config is None else config_lib.parse(config)
  except config_lib.ConfigError:
    return None


def describe_run(settings: config_lib.Settings | None, workdir: str) -> str:
  """'unet, 3 slices of ICE + TLD, on runs/vol.zarr' for the curves' title, from the
  experiment's settings; the workdir's path when there are none."""
  if settings is None:
    return f"run {palette.stack_name(os.path.abspath(workdir))}"
  model = settings.model_name or "model"
  features = getattr(settings.model, "features", ())
  if features:
    model = f"{model} ({'-'.join(str(f) for f in features)} features)"
  d = settings.data
  inputs = " + ".join(d.channels) or "?"
  if d.slices:
    inputs = f"{d.slices} slice{'s' if d.slices != 1 else ''} of {inputs}"
  text = f"{model}, {inputs}"
  return f"{text}, on {palette.stack_name(d.path)}" if d.path else text


def _times(weight: float, term: str) -> str:
  return term if weight == 1 else f"{weight:g} x {term}"


def loss_names(settings: config_lib.Settings | None) -> tuple[str, str]:
  """(the training loss, the validation loss) as trained with `settings`, in words.

  Validation scores the full-resolution supervised loss only; training adds what the
  settings add to it: deep supervision, a distillation teacher, a semi-supervised term.
  None (no saved config): the default class-weighted cross-entropy + Dice.
  """
  if settings is None:
    return ("class-weighted cross-entropy + Dice",) * 2
  train, distill, semi = settings.train, settings.distill, settings.semi
  ce = "class-weighted cross-entropy" if train.class_weights else "cross-entropy"
  dice = train.dice_weight
  base = ce if dice == 0 else f"{ce} + {_times(dice, 'Dice')}"
  trained = f"{base}, deep-supervised" if train.deep_supervision else base
  if distill.teacher and distill.weight > 0:
    members = len(distill.teacher)
    who = (
      "a random forest's"
      if distill.teacher == ("forest",)
      else f"an ensemble of {members}'s"
      if members > 1
      else "the teacher's"
    )
    trained += f" + {_times(distill.weight, f'soft cross-entropy to {who} probabilities')}"
  if semi.enabled:
    term = "pseudo-label consistency" if semi.mode == "pseudo" else "soft consistency"
    trained += f" + {_times(semi.weight, term)} (unlabelled)"
  return trained, base


def smooth(values: list[float]) -> np.ndarray:
  """A centred running mean of logged values over about a tenth of them (at least 3),
  the window shrinking at the ends: no lag behind the raw curve, unlike a moving average
  of the past."""
  values = np.asarray(values, np.float64)
  half = max(1, len(values) // 20)
  sums = np.concatenate([[0.0], np.cumsum(values)])
  index = np.arange(len(values))
  lo, hi = np.maximum(index - half, 0), np.minimum(index + half + 1, len(values))
  return (sums[hi] - sums[lo]) / (hi - lo)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the metrics rows that hold `key`."""
  points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
  return [p[0] for p in points], [p[1] for p in points]


def plot_curves(
  workdir: str, out: str | None = None, *, settings: config_lib.Settings | None = None
) -> str | None:
  """Plots training loss, validation loss and IoU against step; returns the PNG path.

  The training loss is drawn raw (faint: one batch can spike) and smoothed (`smooth`);
  every validation is a marker on its curves. The loss axis names the loss the config
  trained (`loss_names`). Each class's IoU curve is drawn in the class's colour of every
  other figure (`palette`), and the title names the model, its inputs and the volume.

  Args:
    workdir: the training workdir (its metrics.jsonl).
    out: the PNG; default workdir/training_curves.png.
    settings: the experiment's settings (`config.parse`), for the title (model, inputs
      and volume) and the loss. Default: those saved with the workdir's latest
      checkpoint (`saved_settings`).
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return None
  rows = read_metrics(path)
  if settings is None:
    settings = saved_settings(workdir)
  from matplotlib.figure import Figure  # noqa: PLC0415 - only when plotting
  from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter  # noqa: PLC0415

  def curve(key):
    steps, values = series(rows, key)
    return (steps, values) if steps else None

  fig = Figure(figsize=(11, 4.2))
  ax_loss, ax_iou = fig.subplots(1, 2)
  trained, validated = loss_names(settings)
  s = curve("loss")
  if s:
    raw = ax_loss.plot(*s, lw=0.8, alpha=0.3, label="train loss (each logged step)")[0]
    ax_loss.plot(s[0], smooth(s[1]), color=raw.get_color(), lw=2, label="train loss, smoothed")
  s = curve("val_loss")
  if s:
    same = "" if validated == trained else f" ({validated})"
    ax_loss.plot(*s, marker="o", ms=4, label=f"validation loss{same}")
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("\n".join(textwrap.wrap(f"loss: {trained}", 48)), fontsize=9)
  ax_loss.set_yscale("log")
  losses = [v for key in ("loss", "val_loss") for v in (curve(key) or ((), ()))[1] if v > 0]
  if losses:  # plain numbers (0.5, 1, 2) on the log axis, not 5 x 10^-1
    lo, hi = min(losses) / 1.1, max(losses) * 1.1
    ax_loss.set_ylim(lo, hi)
    ax_loss.yaxis.set_major_locator(FixedLocator(palette.log_ticks(lo, hi)))
    ax_loss.yaxis.set_major_formatter(FuncFormatter(lambda v, _: palette.plain_number(v)))
    ax_loss.yaxis.set_minor_formatter(NullFormatter())
  ax_loss.legend(fontsize=8)
  ax_loss.grid(alpha=0.3)
  ax_loss.set_title("loss", fontsize=10)
  iou_keys = sorted({k for r in rows for k in r if k.startswith("val_iou/")})
  classes = list(settings.data.classes) if settings else []
  order = {c: i for i, c in enumerate(classes)}  # class order, as in every other figure
  iou_keys.sort(key=lambda k: (order.get(k.split("/", 1)[1], len(order)), k))
  for key in iou_keys:
    s = curve(key)
    name = key.split("/", 1)[1]
    if s:
      color = palette.class_color(name)
      ax_iou.plot(*s, label=name, color=color, lw=1.5, alpha=0.85, marker="o", ms=3)
  s = curve("val_miou")
  if s:
    ax_iou.plot(
      *s, label="mean IoU", color="black", linewidth=2.2, ls="--", marker="D", ms=4, mfc="white"
    )
  ax_iou.set_xlabel("step")
  ax_iou.set_ylabel("validation IoU")
  ax_iou.set_ylim(0, 1)
  ax_iou.legend(fontsize=8)
  ax_iou.grid(alpha=0.3)
  ax_iou.set_title("validation IoU per class", fontsize=10)
  for ax in (ax_loss, ax_iou):
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
  fig.suptitle(f"training curves: {describe_run(settings, workdir)}", fontsize=11)
  fig.tight_layout()
  out = out or os.path.join(workdir, CURVES_FILE)
  fig.savefig(out, dpi=100)
  return out
