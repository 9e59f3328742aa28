"""Figures of the study (bar chart with error bars) and of the sweep (IoU against severity).

Drawn on a matplotlib `Figure` with the Agg canvas directly, so no global backend is
touched.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

# Bar colours by kind of row.
_FAMILY_COLORS = {
  "unet_1": "#9ecae1",
  "unet_3": "#3182bd",
  "sensor3d_3": "#31a354",
  "cleaned": "#fd8d3c",
  "classical": "#969696",
  "peer": "#e377c2",
}
_METHOD_STYLE = {
  "network": ("#3182bd", "o"),
  "clean_otsu": ("#fd8d3c", "s"),
  "forest": ("#636363", "^"),
  "taught": ("#31a354", "D"),
}


def _family(row: Mapping[str, Any]) -> str:
  if row["kind"] in ("classical", "peer"):
    return row["kind"]
  if row["inputs"] != "raw":
    return "cleaned"
  return f"{row['architecture']}_{row['slices']}"


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def study_chart(document: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Horizontal bars of mean IoU per row, error bars = std over seeds, to a PNG.

  Args:
    document: the study.json document.
    path: PNG to write.
  """
  rows = document["rows"]
  fig = _figure(8, 1.2 + 0.38 * len(rows))
  ax = fig.subplots()
  y = np.arange(len(rows))[::-1]
  means = np.asarray([r["mean_iou"]["mean"] or 0.0 for r in rows])
  stds = np.asarray([r["mean_iou"]["std"] or 0.0 for r in rows])
  ax.barh(y, means, color=[_FAMILY_COLORS[_family(r)] for r in rows])
  spread = stds > 0  # error bars only where there are several seeds
  ax.errorbar(means[spread], y[spread], xerr=stds[spread], fmt="none", ecolor="black", capsize=3)
  for yi, m, s in zip(y, means, stds, strict=True):
    label = f"{m:.3f}" + (f" ± {s:.3f}" if s > 0 else "")
    ax.text(m + s + 0.01, yi, label, va="center", fontsize=8)
  ax.set_yticks(y, [r["name"] for r in rows], fontsize=8)
  # Room right of 1 for the labels, which then never cover a bar or an error bar.
  ax.set_xlim(0, 1.2)
  ax.set_xticks(np.linspace(0, 1, 6))
  ax.set_xlabel(f"mean IoU on slice(s) {document['setup']['eval_slices']}")
  ax.set_title(f"budget {document['budget']['name']}: mean IoU (error bars: std over seeds)")
  ax.grid(axis="x", alpha=0.3)
  fig.savefig(os.fspath(path), format="png")


def sweep_plot(document: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Mean IoU against each artifact's severity, one panel per artifact, to a PNG.

  Args:
    document: the sweep.json document.
    path: PNG to write.
  """
  artifacts = document["artifacts"]
  fig = _figure(4.2 * max(len(artifacts), 1), 3.8)
  axes = np.atleast_1d(fig.subplots(1, max(len(artifacts), 1), sharey=True))
  for ax, (artifact, curves) in zip(axes, artifacts.items(), strict=False):
    for method, points in curves.items():
      if not points:
        continue
      color, marker = _METHOD_STYLE.get(method, ("black", "o"))
      x = [p["severity"] for p in points]
      m = [p["mean_iou"]["mean"] for p in points]
      s = [p["mean_iou"]["std"] or 0.0 for p in points]
      label = document["methods"].get(method, method)
      ax.errorbar(x, m, yerr=s, color=color, marker=marker, capsize=3, label=label)
    ax.axvline(1.0, color="grey", ls=":", lw=1)  # the default strength
    ax.set_title(artifact)
    ax.set_xlabel("severity (x default)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("mean IoU")
  axes[0].set_ylim(0, 1)
  axes[0].legend(fontsize=8, loc="lower left")
  fig.savefig(os.fspath(path), format="png")


def effort_plot(document: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Mean IoU against labelled pixels (log x), one line per method, to a PNG.

  Args:
    document: the effort.json document.
    path: PNG to write.
  """
  fig = _figure(7.5, 4.6)
  ax = fig.subplots()
  names = {
    "network": "U-Net",
    "forest": "random forest (ilastik-style)",
    "taught": "U-Net taught by the forest",
  }
  rows = document["rows"]
  x = np.asarray([r["labelled_pixels"] for r in rows])
  for method in document["methods"]:
    color, marker = _METHOD_STYLE.get(method, ("black", "o"))
    m = np.asarray([r[method]["mean_iou"]["mean"] for r in rows], float)
    s = np.asarray([r[method]["mean_iou"]["std"] or 0.0 for r in rows], float)
    kinds = [r["level"].split(":")[0] for r in rows]
    for kind, face in (("strokes", "white"), ("slices", color), ("every", color)):
      keep = np.asarray([k == kind for k in kinds])
      if keep.any():
        ax.errorbar(
          x[keep],
          m[keep],
          yerr=s[keep],
          fmt=marker,
          color=color,
          mfc=face,
          capsize=3,
          label=f"{names.get(method, method)}, {kind}",
        )
  for r, xi in zip(rows, x, strict=True):
    top = max(r[m]["mean_iou"]["mean"] for m in document["methods"])
    ax.annotate(
      r["level"], (xi, top), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7
    )
  ax.set_xscale("log")
  ax.set_xlabel(
    f"labelled pixels (at {document['hours_per_mpixel']} h per Mpixel, stated estimate)"
  )
  ax.set_ylabel(f"mean IoU on slice(s) {document['eval_slices']}")
  ax.set_title(f"annotation effort, {len(document['seeds'])} seeds (error bars: std)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  fig.savefig(os.fspath(path), format="png")


def budget_plot(document: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Mean IoU (left) and each class's IoU (right) against training steps, per recipe row.

  Args:
    document: `ablation.compare_budgets`'s document.
    path: PNG to write.
  """
  fig = _figure(11.0, 4.4)
  left, right = fig.subplots(1, 2, sharey=True)
  colors = [f"C{i}" for i in range(10)]
  styles = ["-", "--", ":", "-."]
  for i, (name, points) in enumerate(document["rows"].items()):
    x = [p["steps"] for p in points]
    m = [p["mean_iou"]["mean"] for p in points]
    s = [p["mean_iou"]["std"] or 0.0 for p in points]
    seeds = "/".join(str(len(p["seeds"])) for p in points)  # at each budget
    color, style = colors[i % 10], styles[i % len(styles)]
    left.errorbar(
      x, m, yerr=s, color=color, ls=style, marker="o", capsize=3, label=f"{name} ({seeds} seeds)"
    )
    for j, c in enumerate(document["classes"]):
      y = [p["per_class"][c]["mean"] for p in points]
      right.plot(x, y, color=colors[j % 10], ls=style, marker=".", label=c if i == 0 else None)
  for ax in (left, right):
    ax.set_xscale("log")
    ax.set_xticks(document["steps"], [str(s) for s in document["steps"]])
    ax.minorticks_off()
    ax.set_xlabel(f"training steps (batch {document['batch_size']} x {document['patch']}^2)")
    ax.grid(alpha=0.3)
  left.set_ylabel(f"IoU on slice(s) {document['eval_slices']}")
  left.set_title("mean IoU (error bars: std over seeds)")
  right.set_title("per class (line style: row as on the left)")
  left.legend(fontsize=8, loc="lower right")
  right.legend(fontsize=7, loc="lower right")
  left.set_ylim(0, 1)
  fig.savefig(os.fspath(path), format="png")
