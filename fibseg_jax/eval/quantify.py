"""What materials scientists publish about a segmented microstructure, per phase.

  q = quantify.quantify_stack(prediction_array, classes, voxel_size_nm=(50, 25, 25))
  q.phases[0].largest_cluster_fraction, q.phases[0].percolates, q.phases[0].surface_density

For each phase, on a subvolume that fits a memory budget (the whole stack when it fits,
else a centred box as close to a physical cube as the stack allows; `Subvolume` says
which):

- volume fraction: phase voxels / segmented voxels;
- connectivity: 6-connected (face-sharing) clusters (scipy.ndimage.label): the fraction
  of the phase in the largest cluster, the number of clusters, and percolation along z,
  y and x (one cluster touches both opposite faces of the subvolume). Face adjacency is
  topological, so the voxel size plays no part here;
- surface area: marching cubes with the anisotropic voxel spacing
  (skimage.measure.marching_cubes + mesh_surface_area), after 10 Taubin smoothing steps
  of the mesh (Taubin 1995: lambda 0.5, mu -0.53; vertices on the subvolume faces stay)
  to take out the voxel staircase, which otherwise adds ~8% on curved surfaces (~12% at
  2:1 anisotropy). Remaining bias: a sphere of radius 15 voxels within 2.5%, a cube of
  side L voxels short by about 1/L (the 1-voxel bevel marching cubes puts on edges).
  Reported as surface density S_V (interface area per volume of the box spanned by the
  voxel centres, where the mesh lives, 1/um) and per phase volume (1/um). The
  subvolume's cut faces are not surface;
- caveats (`caveats`): percolation and sizes are flagged where the box is thinner than
  a few times the phase's feature size, or the phase's balls reach the box faces;
- local thickness (pores): the diameter of the largest ball inside the phase that holds
  the voxel (Hildebrand & Rueegsegger 1997), from anisotropic Euclidean distance
  transforms (edt): at most `bins` radii (every distinct distance, else geometric steps,
  ~10% apart for radii from 25 nm to 1 um at 40 bins; a ball rounds down to the next
  radius). The diameter is 2 r
  with r measured to the centre of the nearest voxel outside: within half a voxel of 2 R
  for a digitised ball of radius R, one voxel over for a flat layer (whose walls lie half
  a voxel before those centres on each side). Summarised as a volume-weighted
  pore-size distribution (d10, d50, d90, mean).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import edt
import numpy as np
import tensorstore as ts
from scipy import ndimage, sparse
from skimage import measure

from fibseg_jax.data import volume as volume_lib

NOT_SEGMENTED = volume_lib.IGNORE_LABEL
# 2**24 voxels: a 16 MiB uint8 subvolume; its distance transforms (float32) and cluster
# labels (int32) take ~64 MiB each, and the whole quantification ~1 min on 2 CPU cores.
DEFAULT_MAX_VOXELS = 1 << 24
DEFAULT_BINS = 40
TAUBIN_STEPS = 10
_TAUBIN = (0.5, -0.53)
# Class names whose phase gets a size distribution by default.
PORE_NAMES = ("pore", "void", "porosity")
AXES = ("z", "y", "x")


@dataclasses.dataclass(frozen=True)
class Subvolume:
  """The box that was quantified, in voxels of the stack.

  Attributes:
    start: (z, y, x) first voxel.
    shape: (z, y, x) size.
    stack_shape: (z, y, x) of the whole stack.
  """

  start: tuple[int, int, int]
  shape: tuple[int, int, int]
  stack_shape: tuple[int, int, int]

  @property
  def whole(self) -> bool:
    return self.shape == self.stack_shape

  @property
  def voxels(self) -> int:
    return math.prod(self.shape)

  def slices(self) -> tuple[slice, slice, slice]:
    return tuple(slice(s, s + n) for s, n in zip(self.start, self.shape, strict=True))

  def describe(self, voxel_size_nm: Sequence[float], numbering: Any = None) -> str:
    """E.g. 'the whole stack (z 0:12, y 0:64, x 0:64; ...)'; with `numbering` (the
    volume's `SliceNumbers`, numbered otherwise than z) z gives the user's slice numbers:
    'slices 1..12, y 0:64, ...'."""
    size = " x ".join(f"{n * v / 1000:.3g}" for n, v in zip(self.shape, voxel_size_nm, strict=True))
    box = ", ".join(
      f"{a} {s}:{s + n}" for a, s, n in zip(AXES, self.start, self.shape, strict=True)
    )
    if numbering is not None and not numbering.is_identity:
      z0, depth = self.start[0], self.shape[0]
      first, last = numbering.label(z0), numbering.label(z0 + depth - 1)
      box = f"slices {first}..{last}, " + box.split(", ", 1)[1]
    what = "the whole stack" if self.whole else "a centred subvolume"
    return f"{what} ({box}; {self.voxels} voxels; {size} µm [z, y, x])"

  def to_json(self) -> dict[str, Any]:
    return {
      "start": list(self.start),
      "shape": list(self.shape),
      "whole_stack": self.whole,
      "voxels": self.voxels,
    }


def choose_subvolume(
  shape: Sequence[int], voxel_size_nm: Sequence[float], max_voxels: int = DEFAULT_MAX_VOXELS
) -> Subvolume:
  """The whole stack if it has at most `max_voxels` voxels, else the largest centred box
  within the budget whose sides are as close to equal in nanometres as the stack allows
  (a side the stack cannot fill takes the whole stack along that axis)."""
  shape = tuple(int(s) for s in shape)
  voxel = [float(v) for v in voxel_size_nm]
  if max_voxels < 1:
    raise ValueError(f"max_voxels={max_voxels} must be positive")

  def box(side_nm: float) -> tuple[int, ...]:
    return tuple(max(1, min(n, int(side_nm // v))) for n, v in zip(shape, voxel, strict=True))

  if math.prod(shape) <= max_voxels:
    size = shape
  else:
    lo, hi = 0.0, max(n * v for n, v in zip(shape, voxel, strict=True))
    for _ in range(60):
      mid = (lo + hi) / 2
      lo, hi = (mid, hi) if math.prod(box(mid)) <= max_voxels else (lo, mid)
    size = box(lo)
  start = tuple((n - s) // 2 for n, s in zip(shape, size, strict=True))
  return Subvolume(start=start, shape=tuple(size), stack_shape=shape)


@dataclasses.dataclass(frozen=True)
class Connectivity:
  """Clusters of one phase (6-connected).

  Attributes:
    largest_fraction: voxels of the largest cluster / voxels of the phase (NaN if absent).
    clusters: number of clusters.
    percolates: (z, y, x): one cluster touches both faces of the box across that axis.
  """

  largest_fraction: float
  clusters: int
  percolates: tuple[bool, bool, bool]

  @property
  def percolating_axes(self) -> tuple[str, ...]:
    """The axes ("z", "y", "x") along which the phase percolates."""
    return tuple(a for a, yes in zip(AXES, self.percolates, strict=True) if yes)


def connectivity(mask: np.ndarray) -> Connectivity:
  """Clusters of a phase mask [z, y, x] (bool), face-connected."""
  mask = np.asarray(mask, bool)
  structure = ndimage.generate_binary_structure(3, 1)
  labels, count = ndimage.label(mask, structure=structure)
  if count == 0:
    return Connectivity(float("nan"), 0, (False, False, False))
  sizes = np.bincount(labels.ravel())[1:]
  percolates = []
  for axis in range(3):
    first = np.unique(np.take(labels, 0, axis=axis))
    last = np.unique(np.take(labels, -1, axis=axis))
    both = np.intersect1d(first[first > 0], last[last > 0])
    percolates.append(bool(both.size))
  return Connectivity(float(sizes.max() / sizes.sum()), int(count), tuple(percolates))


def _taubin(vertices: np.ndarray, faces: np.ndarray, fixed: np.ndarray, steps: int) -> np.ndarray:
  """Taubin lambda|mu smoothing of a triangle mesh [V, 3] / [F, 3]; `fixed` vertices stay.

  Each step moves a vertex towards the mean of its edge neighbours (a sparse adjacency
  product); for a 10 M-triangle mesh the adjacency takes ~1 GB while it is built.
  """
  n = len(vertices)
  f = faces.astype(np.int32, copy=False)
  rows = np.concatenate([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
  cols = np.concatenate([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
  ones = np.ones(len(rows), np.float32)
  adjacency = sparse.csr_matrix((ones, (rows, cols)), shape=(n, n))
  del rows, cols, ones
  adjacency.sum_duplicates()
  adjacency.data[:] = 1.0  # an edge shared by two faces counts once
  degree = np.asarray(adjacency.sum(axis=1)).ravel()
  scale = np.where(fixed | (degree == 0), 0.0, 1.0 / np.maximum(degree, 1))[:, None]
  moving = (scale > 0).astype(np.float64)
  v = vertices.astype(np.float64)
  for _ in range(steps):
    for factor in _TAUBIN:
      v += factor * (adjacency @ v * scale - v * moving)
  return v


def surface_area(mask: np.ndarray, voxel_size_nm: Sequence[float], steps: int = TAUBIN_STEPS):
  """Interface area (nm^2) of a phase mask [z, y, x] inside its box (see module doc).

  The mesh lies between voxel centres; faces of the box are not counted, so the area is
  that of the interface within the box (0 for a phase that fills or misses it).
  """
  mask = np.asarray(mask, bool)
  if min(mask.shape) < 2 or mask.all() or not mask.any():
    return 0.0
  spacing = tuple(float(v) for v in voxel_size_nm)
  vertices, faces, _, _ = measure.marching_cubes(mask.astype(np.float32), 0.5, spacing=spacing)
  if steps:
    top = (np.asarray(mask.shape) - 1) * np.asarray(spacing)
    fixed = np.any(np.isclose(vertices, 0) | np.isclose(vertices, top), axis=1)
    vertices = _taubin(vertices, faces, fixed, steps)
  return float(measure.mesh_surface_area(vertices, faces))


def local_thickness(
  mask: np.ndarray, voxel_size_nm: Sequence[float], bins: int = DEFAULT_BINS
) -> np.ndarray:
  """Local thickness (nm) of each voxel of a phase mask [z, y, x]; 0 outside the phase.

  Args:
    mask: bool [z, y, x].
    voxel_size_nm: (z, y, x).
    bins: at most this many ball radii: every distinct distance in the phase when there
      are that few, else geometric steps between the smallest and largest, each moved
      down to the nearest distance that occurs; a ball rounds down to the next radius.

  Returns:
    float32 [z, y, x]: 2 r for the largest ball of radius r (to the centres of the
    voxels outside) that fits in the phase and holds the voxel.
  """
  mask = np.ascontiguousarray(mask, bool)
  spacing = tuple(float(v) for v in voxel_size_nm)
  thickness = np.zeros(mask.shape, np.float32)
  if not mask.any():
    return thickness
  dist = edt.edt(mask, anisotropy=spacing, black_border=False)
  radii = np.unique(dist[mask])
  if len(radii) > bins:
    # Geometric steps from the smallest to the largest distance (the same relative
    # resolution for small and large pores), each moved down to a distance that occurs.
    grid = np.geomspace(radii[0], radii[-1], bins)
    radii = np.unique(radii[np.searchsorted(radii, grid * (1 + 1e-6), side="right") - 1])
  for r in radii[::-1]:
    seeds = dist >= r
    reach = edt.edt(~seeds, anisotropy=spacing, black_border=False)
    hit = (reach < r) & mask & (thickness == 0)
    thickness[hit] = 2 * r
  return thickness


@dataclasses.dataclass(frozen=True)
class SizeDistribution:
  """Volume-weighted distribution of local thickness (diameters in nm).

  Attributes:
    diameters_nm: [n] distinct diameters, ascending.
    volume_fractions: [n] fraction of the phase's volume at each diameter (sums to 1).
    mean_nm: volume-weighted mean diameter.
    d10_nm, d50_nm, d90_nm: diameters below which 10 / 50 / 90 % of the volume lies.
  """

  diameters_nm: np.ndarray
  volume_fractions: np.ndarray
  mean_nm: float
  d10_nm: float
  d50_nm: float
  d90_nm: float

  @classmethod
  def from_thickness(cls, thickness: np.ndarray, mask: np.ndarray) -> SizeDistribution:
    values = thickness[np.asarray(mask, bool)]
    diameters, counts = np.unique(values, return_counts=True)
    fractions = counts / counts.sum()
    cumulative = np.cumsum(fractions)

    def quantile(q: float) -> float:
      return float(diameters[min(len(diameters) - 1, np.searchsorted(cumulative, q - 1e-9))])

    return cls(
      diameters_nm=diameters.astype(np.float64),
      volume_fractions=fractions,
      mean_nm=float(np.sum(diameters * fractions)),
      d10_nm=quantile(0.1),
      d50_nm=quantile(0.5),
      d90_nm=quantile(0.9),
    )

  def to_json(self) -> dict[str, Any]:
    return {
      "mean_nm": self.mean_nm,
      "d10_nm": self.d10_nm,
      "d50_nm": self.d50_nm,
      "d90_nm": self.d90_nm,
      "diameters_nm": [float(d) for d in self.diameters_nm],
      "volume_fractions": [float(f) for f in self.volume_fractions],
    }


# A box thinner than this many times a phase's feature size says little about its
# percolation or its largest sizes.
FEW_TIMES = 3.0
# Above this share of a phase's volume within its local thickness of a box face, its
# sizes are those of regions the box cuts.
FACE_SHARE = 0.1


def feature_size_nm(
  voxels: int, area_nm2: float, voxel_size_nm: Sequence[float], sizes: SizeDistribution | None
) -> tuple[float, str]:
  """(a phase's feature size in nm, how it was measured).

  The d90 of its local thickness when computed, else its mean intercept length
  4 V / S (the mean chord through the phase, stereology's feature size); infinite when
  the phase has no interface inside the box (it fills the box along every line).
  """
  if sizes is not None:
    return sizes.d90_nm, "the d90 of its local thickness"
  if area_nm2 <= 0:
    return math.inf, "no interface inside the box"
  volume_nm3 = voxels * math.prod(float(v) for v in voxel_size_nm)
  return 4 * volume_nm3 / area_nm2, "its mean intercept length 4 V / S"


def face_share(mask: np.ndarray, thickness: np.ndarray, voxel_size_nm: Sequence[float]) -> float:
  """The share of a phase's voxels closer to a box face than half their local thickness:
  those whose ball would cross the face, where the box cut the region they belong to."""
  where = np.nonzero(mask)
  if not where[0].size:
    return 0.0
  to_face = np.full(where[0].shape, np.inf, np.float32)
  for axis, (index, n, v) in enumerate(zip(where, mask.shape, voxel_size_nm, strict=True)):
    del axis
    to_face = np.minimum(to_face, np.minimum(index, n - 1 - index) * float(v))
  return float(np.mean(to_face < thickness[where] / 2))


def _um_text(nm: float) -> str:
  return f"{nm / 1000:.2g} µm"


def caveats(
  name: str,
  shape: Sequence[int],
  voxel_size_nm: Sequence[float],
  connectivity: Connectivity,
  feature: tuple[float, str],
  sizes: SizeDistribution | None = None,
  faces: float = 0.0,
) -> tuple[str, ...]:
  """Why a phase's percolation or sizes may describe the box more than the material.

  - percolation along an axis across which the box is under `FEW_TIMES` the phase's
    feature size (`feature_size_nm`): so thin a box is crossed by chance;
  - sizes, when the box is under `FEW_TIMES` the d90 along an axis (the largest
    regions are cut), or when more than `FACE_SHARE` of the phase lies within its
    local thickness of a box face (`face_share`): local thickness treats the faces as
    open, so the sizes are those of regions the box cut.

  The numbers stay; these sentences go beside them.
  """
  extent = [int(n) * float(v) for n, v in zip(shape, voxel_size_nm, strict=True)]
  size_nm, how = feature
  out = []
  thin = [
    (a, e)
    for a, e, yes in zip(AXES, extent, connectivity.percolates, strict=True)
    if yes and e < FEW_TIMES * size_nm
  ]
  if thin:
    across = ", ".join(f"{_um_text(e)} along {a}" for a, e in thin)
    feature_text = _um_text(size_nm) if math.isfinite(size_nm) else "unbounded"
    out.append(
      f"{name} percolation along {', '.join(a for a, _ in thin)}: the box is only {across}, "
      f"under {FEW_TIMES:g}x the {name} feature size ({feature_text}, {how}); a box this "
      "thin is crossed easily, so this says little about the material"
    )
  if sizes is not None:
    short = [(a, e) for a, e in zip(AXES, extent, strict=True) if e < FEW_TIMES * sizes.d90_nm]
    if short:
      along = ", ".join(f"{_um_text(e)} along {a}" for a, e in short)
      out.append(
        f"{name} sizes: the box is only {along}, under {FEW_TIMES:g}x the d90 "
        f"({_um_text(sizes.d90_nm)}); the largest {name} regions are cut by it"
      )
    if faces > FACE_SHARE:
      out.append(
        f"{name} sizes: {faces:.0%} of the {name} volume lies within its local thickness "
        "of a box face; local thickness treats the faces as open, so these are sizes of "
        f"{name} regions the box cut"
      )
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class PhaseStructure:
  """The quantities of one phase on the subvolume.

  Attributes:
    name: class name.
    voxels: voxels of the phase.
    volume_fraction: voxels / segmented voxels of the subvolume.
    connectivity: clusters and percolation.
    surface_area_nm2: interface area inside the subvolume.
    surface_density_per_um: interface area / subvolume volume (S_V), 1/um.
    surface_per_phase_volume_per_um: interface area / phase volume, 1/um (NaN if absent).
    sizes: local-thickness distribution, or None when not computed for this phase.
    caveats: why its percolation or sizes may say more about the box than about the
      material (`caveats`), one sentence each; () when none applies.
  """

  name: str
  voxels: int
  volume_fraction: float
  connectivity: Connectivity
  surface_area_nm2: float
  surface_density_per_um: float
  surface_per_phase_volume_per_um: float
  sizes: SizeDistribution | None = None
  caveats: tuple[str, ...] = ()

  def to_json(self) -> dict[str, Any]:
    c = self.connectivity
    return {
      "caveats": list(self.caveats),
      "voxels": self.voxels,
      "volume_fraction": _num(self.volume_fraction),
      "largest_cluster_fraction": _num(c.largest_fraction),
      "clusters": c.clusters,
      "percolates": dict(zip(AXES, c.percolates, strict=True)),
      "surface_area_um2": self.surface_area_nm2 / 1e6,
      "surface_density_per_um": _num(self.surface_density_per_um),
      "surface_per_phase_volume_per_um": _num(self.surface_per_phase_volume_per_um),
      "size_distribution": self.sizes.to_json() if self.sizes else None,
    }


@dataclasses.dataclass(frozen=True)
class Quantification:
  """Per-phase structure of a segmented subvolume.

  Attributes:
    subvolume: the box quantified.
    voxel_size_nm: (z, y, x) used for every length, area and distance.
    phases: one entry per class, in class order.
    not_segmented: voxels of the subvolume still 255 (counted in no phase).
  """

  subvolume: Subvolume
  voxel_size_nm: tuple[float, float, float]
  phases: tuple[PhaseStructure, ...]
  not_segmented: int

  def to_json(self) -> dict[str, Any]:
    return {
      "subvolume": self.subvolume.to_json(),
      "voxel_size_nm": list(self.voxel_size_nm),
      "connectivity": "6-connected (voxels sharing a face)",
      "surface": f"marching cubes with voxel spacing, {TAUBIN_STEPS} Taubin steps",
      "local_thickness": "largest inscribed ball (anisotropic EDT), 2 r - min voxel size",
      "not_segmented_voxels": self.not_segmented,
      "phases": {p.name: p.to_json() for p in self.phases},
    }


def _num(value: float) -> float | None:
  return None if value is None or math.isnan(value) else float(value)


def size_classes(classes: Sequence[str], names: Sequence[str] | None = None) -> tuple[int, ...]:
  """Indices of the classes that get a size distribution: `names` if given, else those
  whose name holds one of `PORE_NAMES`.

  Raises:
    ValueError: a name in `names` is not a class.
  """
  if names is not None:
    missing = [n for n in names if n not in classes]
    if missing:
      raise ValueError(f"classes {missing} are not among {list(classes)}")
    return tuple(classes.index(n) for n in names)
  return tuple(i for i, c in enumerate(classes) if any(key in c.lower() for key in PORE_NAMES))


def quantify(
  labels: np.ndarray,
  classes: Sequence[str],
  voxel_size_nm: Sequence[float],
  *,
  sizes_for: Sequence[int] = (),
  bins: int = DEFAULT_BINS,
  subvolume: Subvolume | None = None,
) -> Quantification:
  """Quantifies every phase of a label volume held in memory.

  Args:
    labels: [z, y, x] uint8, class index per voxel, 255 = not segmented.
    classes: class names; label i is classes[i].
    voxel_size_nm: (z, y, x) voxel size in nanometres.
    sizes_for: class indices that get a local-thickness distribution.
    bins: at most this many ball radii for the local thickness.
    subvolume: where `labels` sits in its stack (default: it is the whole stack).

  Returns:
    A `Quantification`.
  """
  labels = np.asarray(labels)
  if labels.ndim != 3:
    raise ValueError(f"labels must be [z, y, x], got shape {labels.shape}")
  voxel = tuple(float(v) for v in voxel_size_nm)
  if subvolume is None:
    subvolume = Subvolume((0, 0, 0), tuple(labels.shape), tuple(labels.shape))
  segmented = int(np.count_nonzero(labels != NOT_SEGMENTED))
  box_um3 = math.prod((n - 1) * v / 1000 for n, v in zip(labels.shape, voxel, strict=True))
  voxel_um3 = math.prod(v / 1000 for v in voxel)
  phases = []
  for i, name in enumerate(classes):
    mask = labels == i
    count = int(np.count_nonzero(mask))
    area = surface_area(mask, voxel)
    sizes, faces = None, 0.0
    if i in sizes_for and count:
      thickness = local_thickness(mask, voxel, bins)
      sizes = SizeDistribution.from_thickness(thickness, mask)
      faces = face_share(mask, thickness, voxel)
      del thickness
    clusters = connectivity(mask)
    feature = feature_size_nm(count, area, voxel, sizes)
    phases.append(
      PhaseStructure(
        name=name,
        voxels=count,
        volume_fraction=count / segmented if segmented else float("nan"),
        connectivity=clusters,
        surface_area_nm2=area,
        surface_density_per_um=area / 1e6 / box_um3 if box_um3 > 0 else float("nan"),
        surface_per_phase_volume_per_um=area / 1e6 / (count * voxel_um3) if count else float("nan"),
        sizes=sizes,
        caveats=caveats(name, labels.shape, voxel, clusters, feature, sizes, faces)
        if count
        else (),
      )
    )
  return Quantification(
    subvolume=subvolume,
    voxel_size_nm=voxel,
    phases=tuple(phases),
    not_segmented=int(labels.size - segmented),
  )


def quantify_stack(
  array: ts.TensorStore,
  classes: Sequence[str],
  voxel_size_nm: Sequence[float],
  *,
  max_voxels: int = DEFAULT_MAX_VOXELS,
  sizes_for: Sequence[int] | None = None,
  bins: int = DEFAULT_BINS,
) -> Quantification:
  """Quantifies a label array [z, y, x] on the subvolume `choose_subvolume` picks.

  Args:
    array: tensorstore [z, y, x] uint8 (`fibseg segment`'s output).
    classes: class names.
    voxel_size_nm: (z, y, x).
    max_voxels: memory budget of the subvolume, in voxels.
    sizes_for: class indices with a size distribution; default the pore classes.
    bins: at most this many ball radii for the local thickness.
  """
  box = choose_subvolume(array.shape, voxel_size_nm, max_voxels)
  labels = array[box.slices()].read().result()
  if sizes_for is None:
    sizes_for = size_classes(classes)
  return quantify(labels, classes, voxel_size_nm, sizes_for=sizes_for, bins=bins, subvolume=box)


# The quantities given an interval, as (report key, how to read it off a phase).
INTERVAL_QUANTITIES = {
  "volume_fraction": lambda p: p.volume_fraction,
  "largest_cluster_fraction": lambda p: p.connectivity.largest_fraction,
  "surface_density_per_um": lambda p: p.surface_density_per_um,
  "d50_nm": lambda p: p.sizes.d50_nm if p.sizes else float("nan"),
}


def intervals(members: Sequence[Quantification], source: str) -> dict[str, Any]:
  """The spread of each phase's quantities over several segmentations of one stack.

  Each member (an ensemble member's or a TTA pass's segmentation, quantified on the same
  subvolume) gives one value per quantity; the interval is their range, with mean and
  std beside it. It shows how much the number depends on the model: a range wider than
  the difference a paper reports says another annotated slice (`fibseg suggest`) may
  change it.

  Args:
    members: >= 2 quantifications with the same classes.
    source: what the members are, for the report ("3 ensemble members: a, b, c").

  Returns:
    {"source", "kind", "members", "phases": {phase: {quantity: {"min", "max", "mean",
    "std", "values"}}}}; quantities a phase lacks (no size distribution) are left out.
  """
  if len(members) < 2:
    raise ValueError(f"an interval needs >= 2 segmentations, got {len(members)}")
  names = [p.name for p in members[0].phases]
  if any([p.name for p in m.phases] != names for m in members):
    raise ValueError("the segmentations quantified for an interval differ in their classes")
  phases = {}
  for i, name in enumerate(names):
    entry = {}
    for key, read in INTERVAL_QUANTITIES.items():
      values = [float(read(m.phases[i])) for m in members]
      if any(math.isnan(v) for v in values):
        continue
      entry[key] = {
        "min": min(values),
        "max": max(values),
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)),
        "values": values,
      }
    phases[name] = entry
  return {
    "source": source,
    "kind": "range (min..max) over the members; mean and std (ddof 1) beside it",
    "members": len(members),
    "phases": phases,
  }


def coverage(interval: dict[str, Any], truth: Quantification) -> dict[str, dict[str, bool]]:
  """Whether each interval of `intervals` holds the truth's value (per phase, quantity)."""
  out = {}
  for phase in truth.phases:
    entry = interval["phases"].get(phase.name, {})
    out[phase.name] = {
      key: bool(r["min"] <= float(INTERVAL_QUANTITIES[key](phase)) <= r["max"])
      for key, r in entry.items()
    }
  return out
