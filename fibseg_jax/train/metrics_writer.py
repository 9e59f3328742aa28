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


def _get(config: Mapping | None, *keys: str):
  for key in keys:
    if config is None:
      return None
    config = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
  return config


def describe_run(config: Mapping | None, workdir: str) -> str:
  """'unet, 3 slices of ICE + TLD, on runs/vol.zarr' for the curves' title, from the
  experiment config; the workdir's path when there is no config."""
  if config is None:
    return f"run {palette.stack_name(os.path.abspath(workdir))}"
  model = _get(config, "model", "name") or "model"
  features = _get(config, "model", "features")
  if isinstance(features, (list, tuple)) and features:
    model = f"{model} ({'-'.join(str(f) for f in features)} features)"
  channels = _get(config, "data", "channels") or ()
  if isinstance(channels, str):
    channels = [c for c in channels.split(",") if c]
  slices = _get(config, "data", "slices")
  inputs = " + ".join(str(c) for c in channels) or "?"
  if slices:
    inputs = f"{slices} slice{'s' if int(slices) != 1 else ''} of {inputs}"
  text = f"{model}, {inputs}"
  path = _get(config, "data", "path")
  return f"{text}, on {palette.stack_name(path)}" if path else text


def _number(value, default: float) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    return default


def _times(weight: float, term: str) -> str:
  return term if weight == 1 else f"{weight:g} x {term}"


def loss_names(config: Mapping | None) -> tuple[str, str]:
  """(the training loss, the validation loss) as trained by `config`, in words.

  Validation scores the full-resolution supervised loss only; training adds what the
  config adds to it: deep supervision, a distillation teacher, a semi-supervised term.
  """
  train = _get(config, "train") or {}
  weighted = _get(train, "class_weights")
  dice = _number(_get(train, "dice_weight"), 1.0)
  ce = "class-weighted cross-entropy" if weighted in (None, True) else "cross-entropy"
  base = ce if dice == 0 else f"{ce} + {_times(dice, 'Dice')}"
  trained = f"{base}, deep-supervised" if _get(train, "deep_supervision") else base
  teacher = str(_get(config, "distill", "teacher") or "")
  distill = _number(_get(config, "distill", "weight"), 1.0)
  if teacher and distill > 0:
    members = [t for t in teacher.split(",") if t.strip()]
    who = (
      "a random forest's"
      if teacher == "forest"
      else f"an ensemble of {len(members)}'s"
      if len(members) > 1
      else "the teacher's"
    )
    trained += f" + {_times(distill, f'soft cross-entropy to {who} probabilities')}"
  semi = _number(_get(config, "semi", "weight"), 0.0)
  if semi > 0:
    mode = _get(config, "semi", "mode") or "pseudo"
    term = "pseudo-label consistency" if mode == "pseudo" else "soft consistency"
    trained += f" + {_times(semi, term)} (unlabelled)"
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
  workdir: str, out: str | None = None, *, config: Mapping | None = None
) -> str | None:
  """Plots training loss, validation loss and IoU against step; returns the PNG path.

  The training loss is drawn raw (faint: one batch can spike) and smoothed (`smooth`);
  every validation is a marker on its curves. The loss axis names the loss the config
  trained (`loss_names`). Each class's IoU curve is drawn in the class's colour of every
  other figure (`palette`), and the title names the model, its inputs and the volume.

  Args:
    workdir: the training workdir (its metrics.jsonl).
    out: the PNG; default workdir/training_curves.png.
    config: the experiment config (ConfigDict or dict), for the title: model, inputs
      and volume. Default: the one saved with the workdir's latest checkpoint.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return None
  rows = read_metrics(path)
  if config is None:
    config = saved_config(workdir)
  from matplotlib.figure import Figure  # noqa: PLC0415 - only when plotting
  from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter  # noqa: PLC0415

  def curve(key):
    steps, values = series(rows, key)
    return (steps, values) if steps else None

  fig = Figure(figsize=(11, 4.2))
  ax_loss, ax_iou = fig.subplots(1, 2)
  trained, validated = loss_names(config)
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
  classes = [str(c) for c in (_get(config, "data", "classes") or ())]
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
  fig.suptitle(f"training curves: {describe_run(config, workdir)}", fontsize=11)
  fig.tight_layout()
  out = out or os.path.join(workdir, CURVES_FILE)
  fig.savefig(out, dpi=100)
  return out
