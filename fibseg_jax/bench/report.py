"""The benchmark's outputs: benchmark.json, BENCHMARKS.md and the table printed at the end."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from fibseg_jax import outputs
from fibseg_jax.bench import figures

JSON_NAME = "benchmark.json"
MARKDOWN_NAME = "BENCHMARKS.md"


def _number(value: float | None) -> str:
  if value is None:
    return "null"
  return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def key_rows(result: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
  """(key, value, target, status) for every key, in `figures.KEYS` order."""
  return [
    (k.name, _number(result[k.name]), k.target_text, result["status"][k.name]) for k in figures.KEYS
  ]


def key_table(result: Mapping[str, Any]) -> str:
  """One plain-text table: each figure next to its target; notes for the missing ones."""
  rows = [("key", "value", "target", "status"), *key_rows(result)]
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  lines = []
  for i, row in enumerate(rows):
    lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if i == 0:
      lines.append("  ".join("-" * w for w in widths))
  lines += [f"{key}: {note}" for key, note in result["notes"].items()]
  return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[Any]], right_from: int = 1) -> list[str]:
  align = ["---" if i < right_from else "---:" for i in range(len(header))]
  lines = [f"| {' | '.join(header)} |", f"| {' | '.join(align)} |"]
  lines += [f"| {' | '.join(str(c) for c in row)} |" for row in rows]
  return lines


def _memory(entry: Mapping[str, Any]) -> str:
  memory = entry.get("memory") or {}
  return f"{memory['peak_mib']:.0f} ({memory['kind']})" if memory else "-"


def markdown(result: Mapping[str, Any]) -> str:
  """BENCHMARKS.md: machine, versions, command, load, the key table and the details."""
  env = result["environment"]
  m = env["machine"]
  details = result["details"]
  memory = f"{m['memory_gib']:.1f} GiB" if m["memory_gib"] else "unknown"
  versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
  lines = [
    "# fibseg_jax benchmark",
    "",
    f"- Machine: {m['cpu']}, {m['cores_usable']} usable of {m['cores_total']} cores, "
    f"{memory} memory; {m['platform']}",
    f"- JAX device: {env['jax_device']['device_kind']} ({env['jax_device']['backend']}, "
    f"{len(env['jax_device']['devices'])} device(s))"
    + (
      f"; torch on {env['torch_device']['device']} ({env['torch_device']['threads']} threads)"
      if "torch_device" in env
      else ""
    ),
    f"- Versions: {versions}",
    f"- Command: `{env['command']}`",
    f"- Load average (1, 5, 15 min): {result['load_average']['start']} at the start, "
    f"{result['load_average']['end']} at the end",
    f"- Preset: {'quick' if result['options']['quick'] else 'full'}; shapes:",
    *(f"  - {name}: {text}" for name, text in result["shapes"].items()),
    "",
    "## Figures",
    "",
    *_md_table(
      ["key", "value", "target", "status", "meaning"],
      [[*row, k.meaning] for row, k in zip(key_rows(result), figures.KEYS, strict=True)],
      right_from=5,
    ),
  ]
  if result["notes"]:
    lines += ["", *(f"- `{k}`: {note}" for k, note in result["notes"].items())]

  lines += ["", "## Race against MONAI (alternating repetitions, medians)", ""]
  rows = []
  for phase, sides in details["race"].items():
    for name, r in sides.items():
      rows.append(
        [
          name,
          phase,
          f"{r['setup_s']:.2f}",
          f"{r['step_s_median'] * 1e3:.1f}",
          f"{r['patches_per_s']:.2f}",
          f"{r['mpixel_per_s']:.3f}",
          r.get("params", "-"),
          _memory(r),
        ]
      )
  lines += _md_table(
    [
      "framework",
      "phase",
      "setup + compile (s)",
      "median step (ms)",
      "patches/s",
      "Mpixel/s",
      "params",
      "peak memory (MiB)",
    ],
    rows,
    right_from=2,
  )

  lines += ["", "## Study configurations (training step, fibseg_jax)", ""]
  rows = []
  for name, r in details["study"].items():
    gflop = f"{r['flops'] / 1e9:.1f}" if r.get("flops") else "-"
    rows.append(
      [
        name,
        r["params"],
        gflop,
        f"{r['compile_s']:.1f}",
        f"{r['step_s_median']:.3f}",
        f"{r['step_s_min']:.3f} - {r['step_s_max']:.3f}",
        f"{r['patches_per_s']:.2f}",
      ]
    )
  lines += _md_table(
    ["config", "params", "GFLOP/step", "compile (s)", "median step (s)", "range (s)", "patches/s"],
    rows,
  )
  mm = details["matmul"]
  lines += [
    "",
    f"Matmul reference: {mm['n']} x {mm['n']} float32, {mm['step_s_median'] * 1e3:.1f} ms, "
    f"{mm['flops_per_s'] / 1e9:.1f} GFLOP/s.",
  ]

  lines += ["", "## Slab loader (3 slices, ICE + TLD, synchronous reads)", ""]
  rows = [
    [
      r["chunk_yx"],
      f"{r['stored_mib']:.0f}",
      f"{r['read_amplification']:.2f}",
      f"{r['patches_per_s_uncached']:.1f}",
      f"{r['patches_per_s_cached']:.1f}",
      r["loadavg_1min"],
    ]
    for r in details["data_path"]["rows"]
  ]
  lines += _md_table(
    [
      "chunk y-x",
      "stored (MiB)",
      "read amplification",
      "patches/s uncached",
      "patches/s 256 MiB cache",
      "load 1 min",
    ],
    rows,
    right_from=0,
  )

  seg = details["segmentation"]
  lines += ["", f"## Whole-volume segmentation ({seg['model']}, fresh child processes)", ""]
  rows = []
  for name, child in seg["children"].items():
    rows.append(
      [
        name,
        "x".join(str(v) for v in seg["volumes"][name]),
        f"{child['mpixels']:.2f}",
        f"{child['seconds']:.2f}",
        f"{seg['bare_s'][name]:.2f}",
        f"{child['peak_rss_mib']:.0f}",
      ]
    )
  lines += _md_table(
    ["volume", "z x y x", "Mpixel", "segment (s)", "bare forward (s)", "peak RSS (MiB)"], rows
  )
  calls = "; ".join(f"{k}: {v}" for k, v in seg["forward_calls"]["4x"].items())
  lines += [
    "",
    f"Forward calls of the 4x volume (rows x tile y x tile x: count): {calls}. Efficiency is "
    "the bare forward time of the extra tiles over the extra segmentation time (4x - 1x), "
    "which leaves out the compile and other one-time costs.",
  ]
  if result["caveats"]:
    lines += ["", "## Caveats", "", *(f"- {c}" for c in result["caveats"])]
  return "\n".join(lines) + "\n"


def claim(out_dir: str) -> tuple[str, str]:
  """Claims `out_dir` for the benchmark's files (see `fibseg_jax.outputs`); their paths.

  Raises:
    outputs.OutputError: `out_dir` holds files the benchmark did not write.
  """
  json_path = os.path.join(out_dir, JSON_NAME)
  outputs.claim(
    out_dir,
    kind="benchmark",
    flag="--out",
    directory=True,
    legacy=(JSON_NAME,),
  )
  return json_path, os.path.join(out_dir, MARKDOWN_NAME)


def write(result: Mapping[str, Any], out_dir: str) -> tuple[str, str]:
  """Writes benchmark.json and BENCHMARKS.md into `out_dir` (created if missing).

  Returns:
    The two paths.
  """
  json_path, md_path = claim(out_dir)
  outputs.write_text(json_path, json.dumps(result, indent=1) + "\n")
  outputs.write_text(md_path, markdown(result))
  return json_path, md_path
