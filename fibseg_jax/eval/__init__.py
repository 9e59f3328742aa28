"""Evaluation of a segmented stack: metrics, phase fractions, report and figures.

  report = eval.evaluate("seg.zarr", "vol.zarr", slices=[20])
  eval.write_report(report, "report/")   # report.json, report.md, slice_0020.png, ...

Metrics agree with scikit-learn's (rows of the confusion matrix are the truth; voxels
labelled 255 are left out; undefined per-class scores are NaN and left out of means).
"""

from fibseg_jax.eval.figures import class_colors, colorize, fractions_figure, slice_figure
from fibseg_jax.eval.inputs import (
  EvaluationError,
  Prediction,
  Truth,
  open_image,
  open_prediction,
  open_truth,
)
from fibseg_jax.eval.metrics import (
  MetricsError,
  SegmentationMetrics,
  StackFractions,
  class_counts,
  confusion_matrix,
  fractions,
  metrics_from_confusion,
  segmentation_metrics,
)
from fibseg_jax.eval.render import markdown, write_report
from fibseg_jax.eval.report import Report, evaluate, parse_slices

__all__ = [
  "EvaluationError",
  "MetricsError",
  "Prediction",
  "Report",
  "SegmentationMetrics",
  "StackFractions",
  "Truth",
  "class_colors",
  "class_counts",
  "colorize",
  "confusion_matrix",
  "evaluate",
  "fractions",
  "fractions_figure",
  "markdown",
  "metrics_from_confusion",
  "open_image",
  "open_prediction",
  "open_truth",
  "parse_slices",
  "segmentation_metrics",
  "slice_figure",
  "write_report",
]
