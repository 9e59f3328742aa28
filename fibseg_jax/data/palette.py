"""What every figure and viewer shares: class colours by name, the scale bar, stack names.

A class keeps its colour wherever it appears (training curves, slice figures, the
fraction profile, the structure and pore-size figures, the OME-Zarr label colours),
because the colour follows the class *name*, never its index or the number of classes:
clinker is orange in a four-class stack and in a three-class one.

  - Known phase names (matched without case, spaces, hyphens or a plural "s": "C-S-H",
    "Pores", "unhydrated clinker") get fixed colours: pore / void / porosity near black,
    C-S-H grey-green, portlandite blue, clinker orange, ettringite, aggregate, and the
    common classes of biological EM (background, mitochondria, membrane, synapse,
    nucleus, vesicle).
  - Numbered names ("class3", as the library names classes nobody named) get colours
    spread far apart in the order of their numbers.
  - Any other name gets a colour from sha256 of its normalised name: the same on every
    machine and run, kept away from the fixed colours and from the figures' own white
    (not annotated), grey (correct) and red (error). Two such names can come out alike
    by chance; name the classes, or add them to `FIXED_COLORS`, where that matters.

This module imports nothing from the package (data/ome.py, data/synth.py, eval/, train/
all import it) and matplotlib only inside the function that draws.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RGB = tuple[float, float, float]

# Colours the figures use for things that are not classes.
NOT_ANNOTATED_COLOR: RGB = (1.0, 1.0, 1.0)
CORRECT_COLOR: RGB = (0.78, 0.78, 0.78)
ERROR_COLOR: RGB = (0.86, 0.08, 0.10)
RESERVED_COLORS: tuple[RGB, ...] = (NOT_ANNOTATED_COLOR, CORRECT_COLOR, ERROR_COLOR)

# Fixed colours of known phases, by canonical name (RGB in 0..1).
FIXED_COLORS: dict[str, RGB] = {
  # Cement paste (the synthetic phantom's four phases first).
  "pore": (0.05, 0.05, 0.08),  # near black, as pores image in SEM
  "csh": (0.56, 0.66, 0.50),  # grey-green
  "portlandite": (0.25, 0.48, 0.88),  # blue
  "clinker": (0.96, 0.60, 0.16),  # orange
  "ettringite": (0.74, 0.40, 0.80),  # lilac
  "aggregate": (0.55, 0.36, 0.20),  # brown
  # Biological EM.
  "background": (0.36, 0.36, 0.40),  # dark grey
  "mitochondria": (0.88, 0.18, 0.60),  # magenta
  "membrane": (1.00, 0.88, 0.10),  # yellow
  "synapse": (0.00, 0.70, 0.70),  # teal
  "nucleus": (0.28, 0.18, 0.62),  # indigo
  "vesicle": (0.60, 0.88, 0.30),  # lime
}
# Other spellings of the same phase, normalised (see `normalise`).
ALIASES: dict[str, str] = {
  **dict.fromkeys(
    ("void", "porosity", "porespace", "air", "airvoid", "crack", "capillarypore"), "pore"
  ),
  **dict.fromkeys(("calciumsilicatehydrate", "cshgel", "hydrate", "hydrationproduct"), "csh"),
  **dict.fromkeys(("ch", "calciumhydroxide"), "portlandite"),
  **dict.fromkeys(
    (
      "unhydrated",
      "unhydratedclinker",
      "unhydratedcement",
      "anhydrous",
      "cementgrain",
      "alite",
      "belite",
      "clinkergrain",
    ),
    "clinker",
  ),
  **dict.fromkeys(("aft",), "ettringite"),
  **dict.fromkeys(("sand", "quartz", "gravel"), "aggregate"),
  **dict.fromkeys(("bg", "extracellular", "extracellularspace", "ecs", "resin"), "background"),
  **dict.fromkeys(("mitochondrion", "mito"), "mitochondria"),
  **dict.fromkeys(
    ("cellmembrane", "plasmamembrane", "boundary", "cellboundary", "boundaries"), "membrane"
  ),
  **dict.fromkeys(("synapticcleft", "psd", "postsynapticdensity"), "synapse"),
  **dict.fromkeys(("nuclei",), "nucleus"),
  **dict.fromkeys(("synapticvesicle", "vesicles"), "vesicle"),
}
# A hashed colour is at least this far (Euclidean, RGB in 0..1) from every fixed and
# reserved colour; the hash is redrawn (salted) until one is.
MIN_DISTANCE = 0.22
# ... and this far from the colours of "class0" .. "class7" (unnamed classes).
MIN_NUMBERED_DISTANCE = 0.1
_AVOIDED_NUMBERED = 8
_HASH_TRIES = 64
_NUMBERED_COLORS = 32
_NUMBERED = re.compile(r"(?:class|label|phase|region|segment)?(\d+)")
# The phantom's phase order: what a bare class count means (`class_colors(4)`).
CEMENT_CLASSES = ("pore", "csh", "portlandite", "clinker")


def normalise(name: str) -> str:
  """A class name as matched: lower case, letters and digits only ("C-S-H" -> "csh")."""
  return re.sub(r"[^0-9a-z]", "", str(name).lower())


def canonical(name: str) -> str | None:
  """The fixed-colour name a class name stands for ("Pores" -> "pore"), or None."""
  key = normalise(name)
  for candidate in (key, key[:-1] if key.endswith("s") else None):
    if candidate in FIXED_COLORS:
      return candidate
    if candidate in ALIASES:
      return ALIASES[candidate]
  return None


@functools.cache
def _numbered_colors() -> tuple[RGB, ...]:
  """Colours for numbered names, in order: each the point of an RGB grid farthest from
  the fixed and reserved colours and from the ones before it (farthest-point sampling)."""
  axis = np.linspace(0.1, 0.9, 9)
  grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
  taken = np.asarray([*FIXED_COLORS.values(), *RESERVED_COLORS])
  gap = np.linalg.norm(grid[:, None] - taken[None], axis=-1).min(1)
  picked = []
  for _ in range(_NUMBERED_COLORS):
    i = int(np.argmax(gap))
    picked.append(tuple(round(float(c), 4) for c in grid[i]))
    gap = np.minimum(gap, np.linalg.norm(grid - grid[i], axis=-1))
  return tuple(picked)


def _hashed_color(key: str) -> RGB:
  """The colour of a name without a fixed one. Numbered names ("class 3", "label 3",
  "3") take the number's entry of `_numbered_colors`, so classes numbered in a row are
  far apart; any other name's hue, lightness and saturation come from sha256 of it,
  redrawn (salted) until the colour is `MIN_DISTANCE` from the fixed and reserved ones
  and `MIN_NUMBERED_DISTANCE` from the first numbered ones (the best of `_HASH_TRIES`
  draws if none is). Two such names can still come out alike, by chance."""
  numbered = _NUMBERED.fullmatch(key)
  if numbered and int(numbered.group(1)) < _NUMBERED_COLORS:
    return _numbered_colors()[int(numbered.group(1))]
  taken = [*FIXED_COLORS.values(), *RESERVED_COLORS]
  first_numbered = _numbered_colors()[:_AVOIDED_NUMBERED]
  best, best_score = None, -math.inf
  for attempt in range(_HASH_TRIES):
    digest = hashlib.sha256(f"{key}#{attempt}".encode()).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536.0
    lightness = 0.32 + 0.36 * digest[2] / 255.0
    saturation = 0.55 + 0.4 * digest[3] / 255.0
    rgb = tuple(round(c, 4) for c in colorsys.hls_to_rgb(hue, lightness, saturation))
    gap = min(math.dist(rgb, t) for t in taken)
    numbered_gap = min(math.dist(rgb, t) for t in first_numbered)
    if gap >= MIN_DISTANCE and numbered_gap >= MIN_NUMBERED_DISTANCE:
      return rgb
    score = min(gap - MIN_DISTANCE, numbered_gap - MIN_NUMBERED_DISTANCE)
    if score > best_score:
      best, best_score = rgb, score
  return best


def class_color(name: str) -> RGB:
  """RGB in [0, 1] of the class `name`: its fixed colour, else one from its name's hash."""
  fixed = canonical(name)
  if fixed is not None:
    return FIXED_COLORS[fixed]
  return _hashed_color(normalise(name) or str(name))


def class_colors(classes: Sequence[str] | int) -> np.ndarray:
  """RGB colours [n, 3] in [0, 1], row i the colour of classes[i] (`class_color`).

  Args:
    classes: class names; or a bare count n for unnamed classes, which are taken as the
      phantom's phases (pore, csh, portlandite, clinker) and then "class 4", "class 5",
      ... Pass the names wherever they are known.
  """
  if isinstance(classes, (int, np.integer)):
    n = int(classes)
    classes = [CEMENT_CLASSES[i] if i < len(CEMENT_CLASSES) else f"class {i}" for i in range(n)]
  return np.asarray([class_color(c) for c in classes], np.float64).reshape(-1, 3)


def class_colormap(classes: Sequence[str]):
  """A matplotlib ListedColormap of the classes' colours (label i -> classes[i])."""
  from matplotlib.colors import ListedColormap  # noqa: PLC0415 - figures only

  return ListedColormap(class_colors(classes), name="fibseg_classes")


# --- lengths and scale bars -----------------------------------------------------------


def round_length_nm(target_nm: float) -> float:
  """The 1-2-5 length (1, 2, 5, 10, 20, ... nm) nearest to `target_nm` on a log scale."""
  if not (math.isfinite(target_nm) and target_nm > 0):
    raise ValueError(f"length must be a positive number of nm, got {target_nm}")
  exponent = math.floor(math.log10(target_nm))
  candidates = [m * 10.0**e for e in (exponent - 1, exponent, exponent + 1) for m in (1, 2, 5)]
  return min(candidates, key=lambda v: abs(math.log(v / target_nm)))


def format_length(nm: float) -> str:
  """'500 nm', '2 µm', '0.5 nm': nm below 1 µm, µm from 1 µm up, no scientific notation."""
  if nm >= 1000:
    return f"{plain_number(nm / 1000)} µm"
  return f"{plain_number(nm)} nm"


def plain_number(value: float, digits: int | None = None) -> str:
  """A tick or length value without powers of ten: 2000 -> '2000', 0.05 -> '0.05';
  rounded to `digits` significant digits when given (524.404 -> '524' for 3)."""
  value = float(value)
  decimals = 3
  if digits is not None and value and math.isfinite(value):
    places = digits - 1 - math.floor(math.log10(abs(value)))
    value, decimals = round(value, places), max(0, places)
  if value and abs(value) < 10.0**-decimals:
    return f"{value:.2g}"
  text = f"{value:.{decimals}f}"
  text = text.rstrip("0").rstrip(".") if "." in text else text
  return "0" if text in ("", "-0") else text


def log_ticks(lo: float, hi: float, max_ticks: int = 7) -> list[float]:
  """Tick positions for a log axis from lo to hi (> 0): the densest of the mantissa sets
  1-9, 1-2-3-5, 1-2-5, 1-3, 1 (times powers of ten) that gives at most `max_ticks` ticks
  (at least one decade start in range when there is one)."""
  if not (0 < lo < hi):
    return [lo] if lo > 0 else []
  for subs in ((1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 5), (1, 2, 5), (1, 3), (1,)):
    ticks = [
      m * 10.0**e
      for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
      for m in subs
      if lo <= m * 10.0**e <= hi
    ]
    if 2 <= len(ticks) <= max_ticks:
      return ticks
  ticks = [10.0**e for e in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)]
  if len(ticks) >= 2:  # many decades: every k-th decade
    return ticks[:: math.ceil(len(ticks) / max_ticks)]
  # Less than a decade between two 1-2-3-5 values: round values, evenly spaced.
  from matplotlib.ticker import MaxNLocator  # noqa: PLC0415 - figures only

  return [float(t) for t in MaxNLocator(nbins=4).tick_values(lo, hi) if lo <= t <= hi]


def scale_bar_length_nm(width_px: float, pixel_nm: float, fraction: float = 0.2) -> float:
  """A round scale-bar length for an image `width_px` pixels of `pixel_nm` wide: the 1-2-5
  value nearest `fraction` of the width (384 px at 25 nm: 1.92 µm -> 2 µm)."""
  if not (pixel_nm and pixel_nm > 0 and width_px > 0):
    raise ValueError(f"need a positive width and pixel size, got {width_px} px at {pixel_nm} nm")
  return round_length_nm(width_px * pixel_nm * fraction)


def add_scale_bar(
  ax: Any,
  pixel_nm: float,
  width_px: float,
  *,
  fraction: float = 0.2,
  loc: str = "lower left",
  fontsize: float = 9,
) -> Any:
  """Draws a white scale bar with a black outline (readable on any image) on an image Axes.

  Args:
    ax: the Axes holding the image, one data unit = one displayed pixel.
    pixel_nm: size of a displayed pixel in nm (the voxel x size times any subsampling).
    width_px: displayed width of the image in pixels.
    fraction: about how much of the width the bar spans.
    loc: where, as for a legend.
    fontsize: label size in points.

  Returns:
    The AnchoredSizeBar artist (its label in `.txt_label`).
  """
  from matplotlib import patheffects  # noqa: PLC0415 - figures only
  from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar  # noqa: PLC0415

  length_nm = scale_bar_length_nm(width_px, pixel_nm, fraction)
  label = format_length(length_nm)
  height = ax.get_ylim()
  thickness = max(abs(height[0] - height[1]) * 0.012, 1.0)
  bar = AnchoredSizeBar(
    ax.transData,
    length_nm / pixel_nm,
    label,
    loc,
    pad=0.5,
    borderpad=0.4,
    sep=3,
    color="white",
    frameon=False,
    size_vertical=thickness,
    label_top=True,
    fontproperties={"size": fontsize, "weight": "bold"},
  )
  outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
  for rect in bar.size_bar.get_children():
    rect.set_path_effects(outline)
    rect.set_edgecolor("black")
    rect.set_linewidth(0.8)
  for text in bar.txt_label.get_children():
    text.set_path_effects(outline)
  bar.fibseg_length_nm = length_nm  # what the bar stands for, for tests and callers
  ax.add_artist(bar)
  return bar


# --- naming a stack -------------------------------------------------------------------

_MAX_NAME = 48


def stack_name(root: Any) -> str:
  """A short name for a volume or array in figure titles: its path (the last few
  components when long); 'in-memory volume' for a memory kvstore."""
  if root is None:
    return ""
  if isinstance(root, Mapping):
    kv = root.get("kvstore", root)
    path = kv.get("path", "") if isinstance(kv, Mapping) else ""
    if isinstance(kv, Mapping) and kv.get("driver") == "memory":
      return f"in-memory volume {path.strip('/')}".strip()
    return path.rstrip("/") or str(kv.get("driver", "volume"))
  text = os.fspath(root)
  if "://" in text:
    return text if len(text) <= _MAX_NAME else "…" + text[-_MAX_NAME + 1 :]
  text = os.path.normpath(text)
  parts = text.split(os.sep)
  while len(parts) > 2 and len(os.sep.join(parts)) > _MAX_NAME:
    parts = parts[1:]
  short = os.sep.join(parts)
  return short if short == text else "…" + os.sep + short
