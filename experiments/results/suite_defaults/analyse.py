# ruff: noqa: B023, E501
"""Tables of the suite defaults from the regression cells and the segmentation cells."""

import json
import os
import statistics as st

ROOT = "/work/runs/regression_quick"
SEG = "/work/runs/segsettings"
STACKS = [
  "drosophila_vnc",
  "sbem_mito",
  "flyem_medulla",
  "isbi2012_vnc",
  "synthetic",
  "synthetic_harsh",
  "synthetic_drift",
]


def ms(v):
  return (st.mean(v), st.stdev(v) if len(v) > 1 else 0.0)


def fmt(v, pts=False):
  m, s = ms(v)
  k = 100 if pts else 1
  return f"{m * k:+.1f} +- {s * k:.1f}" if pts else f"{m:.3f} +- {s:.3f}"


def load(path):
  return json.load(open(path)) if os.path.exists(path) else None


out = {}
rows = []
for stack in STACKS:
  r = {}

  def cell(row, s):
    return load(f"{ROOT}/{stack}/{row}_s{s}/result.json")

  def seg(row, s, v):
    return load(f"{SEG}/{stack}/{row}_s{s}_{v}.json")

  def fit(row, s, t, m):
    return load(f"{SEG}/fitted/{stack}/{row}_s{s}_t{t}_{m}.json")

  seeds = [s for s in (0, 1, 2) if cell("release", s) and cell("previous", s)]
  if not seeds:
    continue
  g = lambda f: [f(s) for s in seeds]
  r["seeds"] = seeds
  r["previous"] = g(lambda s: cell("previous", s)["mean_iou"])
  r["release"] = g(lambda s: cell("release", s)["mean_iou"])
  r["lr_diff"] = [a - b for a, b in zip(r["release"], r["previous"], strict=False)]
  if all(seg("release", s, "t768_p2") for s in seeds):
    p1 = g(lambda s: seg("release", s, "t768_p1")["mean_iou"])
    p2 = g(lambda s: seg("release", s, "t768_p2")["mean_iou"])
    r["tta_p1"], r["tta_p2"] = p1, p2
    r["tta_diff"] = [b - a for a, b in zip(p1, p2, strict=False)]
    r["tta_s"] = (
      g(lambda s: seg("release", s, "t768_p1")["seconds"]),
      g(lambda s: seg("release", s, "t768_p2")["seconds"]),
    )
  if all(seg("previous", s, "t512_p16") and seg("release", s, "t768_p1") for s in seeds):
    old = g(lambda s: seg("previous", s, "t512_p16")["mean_iou"])
    new = g(lambda s: seg("release", s, "t768_p1")["mean_iou"])
    r["end_old"], r["end_new"] = old, new
    r["end_diff"] = [b - a for a, b in zip(old, new, strict=False)]
    prev_new_seg = g(lambda s: seg("previous", s, "t768_p1")["mean_iou"])
    r["seg_diff_prev"] = [b - a for a, b in zip(old, prev_new_seg, strict=False)]
  for t in (256, 768):
    if all(
      fit(row, s, t, m)
      for row in ("release", "previous")
      for s in seeds
      for m in ("fitted", "full")
    ):
      d = [
        fit(row, s, t, "fitted")["mean_iou"] - fit(row, s, t, "full")["mean_iou"]
        for row in ("release", "previous")
        for s in seeds
      ]
      r[f"fit_diff_{t}"] = d
  out[stack] = r
json.dump(out, open("/work/runs/analysis/suite_defaults.json", "w"), indent=1)


def table(title, key, head, pts=True):
  lines = [f"### {title}", "", f"| stack | {head} |", "| --- | --- |"]
  means = []
  for stack, r in out.items():
    if key in r:
      lines.append(f"| {stack} | {fmt(r[key], pts)} |")
      means.append(st.mean(r[key]))
  if len(means) > 1:
    m, s = ms(means)
    lines.append(f"| **mean over {len(means)} stacks** | **{m * 100:+.1f} +- {s * 100:.1f}** |")
  return "\n".join(lines) + "\n"


md = [
  "| stack | seeds | previous (lr 1e-3) | release (lr 3e-3) | release - previous (points) |",
  "| --- | --- | --- | --- | --- |",
]
means = []
for stack, r in out.items():
  md.append(
    f"| {stack} | {len(r['seeds'])} | {fmt(r['previous'])} | {fmt(r['release'])} | {fmt(r['lr_diff'], True)} |"
  )
  means.append(st.mean(r["lr_diff"]))
m, s = ms(means)
md.append(f"| **mean over {len(means)} stacks** | | | | **{m * 100:+.1f} +- {s * 100:.1f}** |")
text = "### The learning rate (training, the study's tiles)\n\n" + "\n".join(md) + "\n\n"
text += table(
  "Two TTA passes against one (release networks, tile 768)", "tta_diff", "2 passes - 1 (points)"
)
text += "\n" + table(
  "Fitted tiles against full tiles, tile 256 (both rows, 6 networks)",
  "fit_diff_256",
  "fitted - full (points)",
)
text += "\n" + table(
  "Fitted tiles against full tiles, tile 768 (both rows, 6 networks)",
  "fit_diff_768",
  "fitted - full (points)",
)
text += "\n" + table(
  "End to end: this release (lr 3e-3, tile 768, 1 pass) against the earlier one (lr 1e-3, tile 512, 16 passes)",
  "end_diff",
  "this - earlier (points)",
)
text += "\n" + table(
  "Segmentation defaults alone (lr 1e-3 networks): tile 768 1 pass against tile 512 16 passes",
  "seg_diff_prev",
  "today's segment - earlier segment (points)",
)
open("/work/runs/analysis/suite_defaults.md", "w").write(text)
print(text)
