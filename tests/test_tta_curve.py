"""The TTA pass curve's table: gains paired by network, costs relative to one pass."""

import pytest

from fibseg_jax.study import tta


def test_curve_rows_pair_each_network_with_its_own_one_pass():
  runs = {
    "s0": {1: (0.80, 2.0), 2: (0.81, 4.0), 16: (0.82, 32.0)},
    "s1": {1: (0.90, 3.0), 2: (0.90, 6.0), 16: (0.92, 48.0)},
  }
  results = {
    w: {
      k: {"mean_iou": m, "forward_s_per_mpixel": f, "segment_s_per_mpixel": 2 * f}
      for k, (m, f) in r.items()
    }
    for w, r in runs.items()
  }
  rows = tta.curve_rows(results, [1, 2, 16])
  assert [r["passes"] for r in rows] == [1, 2, 16]
  assert rows[0]["gain"] == 0 and rows[0]["forward_cost"] == pytest.approx(1.0)
  assert rows[1]["gain"] == pytest.approx(0.005) and rows[1]["forward_cost"] == pytest.approx(2.0)
  assert rows[2]["gain"] == pytest.approx(0.02) and rows[2]["gain_std"] == pytest.approx(0.0)
  assert rows[2]["mean_iou"] == pytest.approx(0.87)
  doc = {
    "volume": "v.zarr",
    "eval_slices": [20],
    "workdirs": ["s0", "s1"],
    "settings": {},
    "rows": rows,
  }
  table = tta.markdown(doc)
  assert "| 16 | 0.8700 +- 0.0707 | +2.00 +- 0.00 pts |" in table
