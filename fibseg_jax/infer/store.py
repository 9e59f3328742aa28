"""The output arrays of a segmentation run, and which of their blocks are finished.

`--output` is one zarr v3 array (``seg.zarr/zarr.json`` is an array's metadata):
labels [z, y, x] uint8, fill value 255 = not segmented yet. Optional companion arrays
(`COMPANIONS`) are written next to it, block for block: `--probabilities`
[z, y, x, classes] uint8 holding round(255 * p), and `--uncertainty` [z, y, x] uint8
holding round(255 * entropy(p) / log(classes)) (0 = certain, 255 = uniform). All carry
in their attributes the class names (``classes``) and the run that wrote them
(``fibseg_segmentation``: source volume, checkpoint, channels, slices, tiling), so the
numbers in them mean something on their own.

A block is finished when the marker key ``fibseg_done/<z>.<y0>.<x0>`` exists next to
the labels array's chunks. The marker is written only after the block's label (and
companion) writes have completed, so a rerun after an interruption skips exactly the
blocks whose data is on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tensorstore as ts

from fibseg_jax import outputs
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer.tiling import InferenceError

FORMAT_VERSION = 1
ATTRIBUTE = "fibseg_segmentation"
DONE_PREFIX = "fibseg_done/"
NOT_SEGMENTED = volume_lib.IGNORE_LABEL
# Fields of the run record that must agree before an existing output is resumed.
RUN_FIELDS = (
  "source",
  "shape",
  "classes",
  "channels",
  "slices",
  "checkpoint",
  "tile",
  "overlap",
  "window",
  "block",
  "probabilities",
  # Only in the records of runs that use them, so outputs of earlier runs still resume.
  "uncertainty",
  "tta",
  "only_slices",
)
# Streaming reads and writes bypass the shared chunk cache: segmentation reads every
# slice about once (`SlabReader` keeps what it reuses) and writes every chunk once, so a
# cache would only grow with the volume, up to its limit. A child of the shared
# context, so memory:// stores stay visible.
STREAM_CONTEXT = ts.Context(
  ts.Context.Spec({"cache_pool": {"total_bytes_limit": 0}}), parent=volume_lib.CONTEXT
)


class OutputError(InferenceError):
  """An output path that exists, belongs to another run, or cannot be written."""


def source_id(root: Any) -> str:
  """A stable name for a volume root: absolute for local paths, as given otherwise."""
  path = volume_lib.local_path(root)
  return path if path is not None else volume_lib.describe(root)


def read_array_metadata(path: Any) -> dict[str, Any] | None:
  """The zarr.json of an array or group at `path`, or None when nothing is there.

  Raises:
    OutputError: `path` is a file, or a non-empty directory without zarr.json, or its
      zarr.json is not JSON.
  """
  where = volume_lib.describe(path)
  local = volume_lib.local_path(path)
  if local is not None:
    if os.path.isfile(local):
      raise OutputError(f"{where} is a file, not a zarr array directory")
    if not os.path.exists(local):
      return None
  kv = ts.KvStore.open(volume_lib.kvstore_spec(path), context=volume_lib.CONTEXT).result()
  result = kv.read("zarr.json").result()
  if result.state != "value":
    if local is not None and os.listdir(local):
      raise OutputError(
        f"{where} exists and is not a zarr array (no zarr.json); choose another path or "
        "remove it yourself"
      )
    if local is None and kv.list().result():
      raise OutputError(f"{where} holds data but no zarr.json; choose another path")
    return None
  try:
    return json.loads(result.value)
  except json.JSONDecodeError as e:
    raise OutputError(f"{where}/zarr.json is not valid JSON: {e}") from e


def read_attributes(path: Any) -> dict[str, Any]:
  """The attributes of the zarr v3 array at `path` ({} for an array without any).

  Raises:
    OutputError: nothing at `path`, or it is not a zarr v3 array.
  """
  meta = read_array_metadata(path)
  where = volume_lib.describe(path)
  if meta is None:
    raise OutputError(f"{where}: no such array")
  if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
    raise OutputError(f"{where} is not a zarr v3 array (it is a {meta.get('node_type')})")
  return dict(meta.get("attributes", {}))


def read_source(path: Any) -> str | None:
  """The input volume a segmentation output at `path` was made from, or None."""
  try:
    attrs = read_attributes(path)
  except OutputError:
    return None
  source = attrs.get(ATTRIBUTE, {}).get("run", {}).get("source")
  return str(source) if source else None


def open_array(path: Any) -> ts.TensorStore:
  """Opens an existing zarr v3 array (never creates or deletes anything).

  Raises:
    OutputError: no zarr v3 array at `path`.
  """
  where = volume_lib.describe(path)
  meta = read_array_metadata(path)
  if meta is None:
    raise OutputError(f"{where}: no such array (nothing there)")
  if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
    raise OutputError(f"{where} is not a zarr v3 array (it is a {meta.get('node_type')})")
  try:
    return ts.open(
      {"driver": "zarr3", "kvstore": volume_lib.kvstore_spec(path)},
      open=True,
      context=volume_lib.CONTEXT,
    ).result()
  except ValueError as e:
    # tensorstore's message repeats the whole JSON spec; keep its first clause
    reason = str(e).split(": {", 1)[0]
    raise OutputError(f"{where}: cannot open zarr v3 array: {reason}") from e


class NotAnArray(OutputError):
  """No zarr v3 array at a path.

  Attributes:
    reason: "missing" (nothing there, or a file), "no_metadata" (no zarr.json),
      "bad_metadata" (zarr.json is not JSON) or "not_array" (a group, or not zarr v3).
    node_type: what zarr.json says is there, for "not_array".
  """

  def __init__(self, message: str, reason: str, node_type: Any = None):
    super().__init__(message)
    self.reason = reason
    self.node_type = node_type


@dataclasses.dataclass(frozen=True)
class Segmentation:
  """An opened segmentation output: labels, or a companion array (or any zarr v3 array).

  Attributes:
    path: as given.
    array: tensorstore; [z, y, x] uint8 for labels and uncertainty, [z, y, x, classes]
      uint8 for probabilities (rank and dtype are the caller's to check).
    classes: class names from the attributes, or () when it has none.
    run: the run record `fibseg segment` stored (`ATTRIBUTE`), or {}.
    kind: what `fibseg segment` wrote it as ("labels", "probabilities", "uncertainty"), or
      None for an array it did not write.
    attributes: all of the array's attributes.
  """

  path: Any
  array: ts.TensorStore
  classes: tuple[str, ...]
  run: dict[str, Any]
  kind: str | None = None
  attributes: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def source(self) -> str | None:
    """The input volume it was segmented from (run record), or None."""
    source = self.run.get("source")
    return str(source) if source else None

  @property
  def voxel_size_nm(self) -> tuple[float, float, float] | None:
    """(z, y, x) voxel size in nm of the source volume (run record), or None."""
    voxel = self.run.get("voxel_size_nm")
    return tuple(float(v) for v in voxel) if voxel and len(voxel) == 3 else None

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(int(s) for s in self.array.shape)


def open_segmentation(path: Any) -> Segmentation:
  """Opens an existing segmentation output (never creates or deletes anything).

  The one place that reads a `fibseg segment` array with what its attributes say about it:
  evaluation, export and slice suggestion open their inputs here.

  Raises:
    NotAnArray: nothing at `path`, or not a zarr v3 array (`reason` says which).
    OutputError: the array cannot be opened.
  """
  where = volume_lib.describe(path)
  local = volume_lib.local_path(path)
  if local is not None and not os.path.isdir(local):
    what = "is a file, not a zarr array directory" if os.path.isfile(local) else "nothing there"
    raise NotAnArray(f"{where}: no such array ({what})", "missing")
  kv = ts.KvStore.open(volume_lib.kvstore_spec(path), context=volume_lib.CONTEXT).result()
  raw = kv.read("zarr.json").result()
  if raw.state != "value":
    raise NotAnArray(f"{where}: no such array (no zarr.json)", "no_metadata")
  try:
    meta = json.loads(raw.value)
  except json.JSONDecodeError as e:
    raise NotAnArray(f"{where}/zarr.json is not valid JSON: {e}", "bad_metadata") from e
  node_type = meta.get("node_type")
  if meta.get("zarr_format") != 3 or node_type != "array":
    raise NotAnArray(
      f"{where} is not a zarr v3 array (it is a {node_type})", "not_array", node_type
    )
  array = open_array(path)
  attrs = dict(meta.get("attributes", {}))
  info = attrs.get(ATTRIBUTE, {})
  info = info if isinstance(info, Mapping) else {}
  run = info.get("run", {})
  return Segmentation(
    path=path,
    array=array,
    classes=tuple(str(c) for c in attrs.get("classes", ())),
    run=dict(run) if isinstance(run, Mapping) else {},
    kind=info.get("kind"),
    attributes=attrs,
  )


def _spec(path: Any, shape, chunks, dimension_names, attributes, mode: str) -> dict[str, Any]:
  """A zarr3 spec; mode "replace" deletes what is there, "open" requires an array, and
  "open_or_create" creates one only if nothing is there."""
  if mode == "open":
    return {"driver": "zarr3", "kvstore": volume_lib.kvstore_spec(path), "open": True}
  return {
    "driver": "zarr3",
    "kvstore": volume_lib.kvstore_spec(path),
    "metadata": {
      "shape": list(shape),
      "data_type": "uint8",
      "fill_value": NOT_SEGMENTED,
      "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
      "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 3}}],
      "dimension_names": list(dimension_names),
      "attributes": attributes,
    },
    "create": True,
    "open": mode == "open_or_create",
    "delete_existing": mode == "replace",
  }


@dataclasses.dataclass(frozen=True)
class Companion:
  """An optional array written next to the labels, block for block.

  Attributes:
    name: its keyword argument of `segment_volume`, its flag (``--<name>``), its field
      of the run record and its ``kind`` in the attributes.
    per_class: whether it has a trailing class axis ([z, y, x, classes]).
    description: attributes saying what its numbers are.
  """

  name: str
  per_class: bool
  description: Mapping[str, str]

  @property
  def flag(self) -> str:
    return "--" + self.name


PROBABILITIES = Companion(
  "probabilities", per_class=True, description={"encoding": "uint8 = round(255 * probability)"}
)
UNCERTAINTY = Companion(
  "uncertainty",
  per_class=False,
  description={
    "definition": "round(255 * entropy / log(classes))",
    "entropy": "-sum over classes of p log p, p the blended class probabilities",
    "encoding": "uint8; 0 = certain, 255 = uniform over the classes",
  },
)
# In the order their flags are checked and named in messages.
COMPANIONS = (PROBABILITIES, UNCERTAINTY)
_COMPANION_NAMES = frozenset(c.name for c in COMPANIONS)


def _given(probabilities: Any | None, uncertainty: Any | None) -> list[tuple[Companion, Any]]:
  """The companion arrays asked for, with their paths."""
  paths = {"probabilities": probabilities, "uncertainty": uncertainty}
  return [(c, paths[c.name]) for c in COMPANIONS if paths[c.name] is not None]


@dataclasses.dataclass
class SegmentationOutput:
  """The opened output arrays of a run.

  Attributes:
    labels: tensorstore [z, y, x] uint8.
    probabilities: tensorstore [z, y, x, classes] uint8, or None.
    done: marker keys of the blocks finished when the output was opened.
    uncertainty: tensorstore [z, y, x] uint8, or None.
  """

  labels: ts.TensorStore
  probabilities: ts.TensorStore | None
  done: set[str]
  _markers: ts.KvStore
  uncertainty: ts.TensorStore | None = None

  def mark_done(self, key: str) -> ts.Future:
    """Records a block as finished; call only after its data writes completed."""
    return self._markers.write(DONE_PREFIX + key, b"")

  def finished_keys(self) -> set[str]:
    """Marker keys of every finished block, read now from the store."""
    return list_done(self._markers)


def list_done(kv: ts.KvStore) -> set[str]:
  rng = ts.KvStore.KeyRange(inclusive_min=DONE_PREFIX, exclusive_max=DONE_PREFIX[:-1] + "0")
  keys = kv.list(rng, strip_prefix_length=len(DONE_PREFIX)).result()
  return {k.decode() for k in keys}


@dataclasses.dataclass(frozen=True)
class OutputPlan:
  """What `prepare_output` decided from what is at the output paths."""

  action: str  # "create" (nothing there, or --overwrite) or "resume"
  done: frozenset[str]


def _same_root(a: Any, b: Any) -> bool:
  return volume_lib.kvstore_spec(a) == volume_lib.kvstore_spec(b)


def _own_kind(meta: Mapping[str, Any], kind: str, flag: str, where: str) -> Mapping[str, Any]:
  """The run record of an array `fibseg segment` wrote as `kind`; anything else is refused,
  with or without --overwrite (fibseg replaces only its own outputs)."""
  info = meta.get("attributes", {}).get(ATTRIBUTE)
  if not isinstance(info, Mapping) or info.get("kind") != kind:
    raise OutputError(
      f"{flag}={where} exists and is not a {kind} array written by `fibseg segment`; fibseg "
      "replaces only its own outputs, with or without --overwrite: choose another path"
    )
  return info


def _check_existing(path: Any, kind: str, run: Mapping[str, Any], flag: str) -> bool:
  """True when a fibseg array of the same run is at `path`; False when nothing is there."""
  where = volume_lib.describe(path)
  meta = read_array_metadata(path)
  if meta is None:
    return False
  if meta.get("node_type") != "array":
    raise OutputError(
      f"{flag}={where} is a zarr group (a volume?), not a segmentation array; choose another path"
    )
  info = _own_kind(meta, kind, flag, where)
  old = info.get("run", {})
  differ = [f for f in RUN_FIELDS if _jsonable(old.get(f)) != _jsonable(run.get(f))]
  if differ:
    detail = ", ".join(f"{f}: {old.get(f)!r} != {run.get(f)!r}" for f in differ)
    # A companion array asked for now but not then (or the reverse) changes every block.
    hints = "".join(
      f"; it was written {'without' if run.get(f) else 'with'} --{f}"
      for f in differ
      if f in _COMPANION_NAMES
    )
    if "tta" in differ:  # the default of `fibseg segment`'s --tta changed over time
      hints += f"; it was written with --tta={tta_flag(old.get('tta'))}"
    raise OutputError(
      f"{flag}={where} exists and belongs to a different run ({detail}){hints}; "
      "pass --overwrite to replace it or choose another path"
    )
  return True


def tta_flag(recorded: Any) -> str:
  """The --tta value of a run record's "tta" (absent: off; True: all; else the count)."""
  if recorded is None or recorded is False:
    return "off"
  return "all" if recorded is True else str(recorded)


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value))


def _and(names: Sequence[str]) -> str:
  return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def plan_output(
  output: Any,
  probabilities: Any | None,
  *,
  run: Mapping[str, Any],
  all_keys: Iterable[str],
  source: Any,
  overwrite: bool,
  uncertainty: Any | None = None,
) -> OutputPlan:
  """Decides, without changing anything, whether to create or resume the output.

  Every process of a run reaches the same decision from the same store, so errors are
  raised everywhere before any process deletes or creates.

  Args:
    output: labels array path.
    probabilities: probabilities array path or None.
    run: the run record (compared with the one stored in existing arrays).
    all_keys: marker keys of every block of the run.
    source: the input volume's root.
    overwrite: replace whatever fibseg arrays are at the paths.
    uncertainty: uncertainty array path or None.

  Raises:
    OutputError: the output is the input volume, exists as something else, belongs to a
      different run, or is complete, each without --overwrite where that would help; a
      companion array is at another output's path, exists without its labels, or is
      missing from an output that has finished blocks.
  """
  given = _given(probabilities, uncertainty)
  if _same_root(output, source):
    raise OutputError(f"--output={volume_lib.describe(output)} is the input volume")
  earlier = [("--output", output), ("--input", source)]
  for companion, path in given:
    if any(_same_root(path, other) for _, other in earlier):
      raise OutputError(
        f"{companion.flag}={volume_lib.describe(path)} must differ from "
        f"{_and([flag for flag, _ in earlier])}"
      )
    earlier.append((companion.flag, path))
  arrays = [("--output", output)] + [(c.flag, path) for c, path in given]
  for flag, path in arrays:
    local = volume_lib.local_path(path)
    if local is not None and not os.path.isdir(os.path.dirname(local) or "."):
      raise OutputError(f"{flag}={path}: parent directory {os.path.dirname(local)} does not exist")
  source_local = volume_lib.local_path(source)
  for flag, path in arrays:
    local = volume_lib.local_path(path)
    if local is not None and source_local is not None:
      a, b = os.path.realpath(local), os.path.realpath(source_local)
      if a.startswith(b + os.sep) or b.startswith(a + os.sep):
        raise OutputError(
          f"{flag}={volume_lib.describe(path)} is inside the input volume "
          f"{volume_lib.describe(source)} or holds it; choose a path outside it"
        )
  if overwrite:
    for flag, path in arrays:
      meta = read_array_metadata(path)
      if meta is not None and meta.get("node_type") != "array":
        raise OutputError(
          f"{flag}={volume_lib.describe(path)} is a zarr group (a volume?), not a "
          "segmentation array; --overwrite replaces only `fibseg segment`'s arrays"
        )
      if meta is not None:
        kind = "labels" if flag == "--output" else flag.lstrip("-")
        _own_kind(meta, kind, flag, volume_lib.describe(path))
    return OutputPlan("create", frozenset())
  has_labels = _check_existing(output, "labels", run, "--output")
  present = [(c, path, _check_existing(path, c.name, run, c.flag)) for c, path in given]
  if not has_labels:
    for companion, path, exists in present:
      if exists:
        raise OutputError(f"{companion.flag}={volume_lib.describe(path)} exists; pass --overwrite")
    return OutputPlan("create", frozenset())
  kv = ts.KvStore.open(volume_lib.kvstore_spec(output), context=volume_lib.CONTEXT).result()
  done = list_done(kv)
  for companion, path, exists in present:
    if not exists and done:
      raise OutputError(
        f"{companion.flag}={volume_lib.describe(path)} is missing but --output "
        f"{volume_lib.describe(output)} has finished blocks; pass --overwrite"
      )
  if set(all_keys) <= done:
    raise OutputError(
      f"--output={volume_lib.describe(output)} exists and is complete; pass --overwrite to "
      "segment again"
    )
  return OutputPlan("resume", frozenset(done))


def open_output(
  output: Any,
  probabilities: Any | None,
  *,
  plan: OutputPlan,
  shape: Sequence[int],
  classes: Sequence[str],
  run: Mapping[str, Any],
  chunk_yx: int,
  may_delete: bool = True,
  uncertainty: Any | None = None,
) -> SegmentationOutput:
  """Creates (or reopens) the output arrays as `plan` says.

  Args:
    output: labels array path.
    probabilities: probabilities array path or None.
    plan: from `plan_output`.
    shape: (z, y, x) of the volume.
    classes: class names; label i is classes[i].
    run: the run record stored in the attributes.
    chunk_yx: y-x chunk side; blocks are multiples of it, so no chunk has two writers.
    may_delete: whether this process replaces existing arrays (only process 0 does,
      the others open what it created).
    uncertainty: uncertainty array path or None.
  """
  z, y, x = (int(s) for s in shape)
  chunks = (1, min(chunk_yx, y), min(chunk_yx, x))
  given = _given(probabilities, uncertainty)
  common = {"format": FORMAT_VERSION, "run": dict(run), "not_segmented": NOT_SEGMENTED}
  paths = {c.name: source_id(path) for c, path in given}
  label_attrs = {
    "classes": list(classes),
    ATTRIBUTE: {**common, "kind": "labels", **{c.name: paths.get(c.name) for c in COMPANIONS}},
  }
  if not may_delete:
    mode = "open_or_create"
  else:
    mode = "replace" if plan.action == "create" else "open"
  opened = {}
  try:
    labels = ts.open(
      _spec(output, (z, y, x), chunks, ("z", "y", "x"), label_attrs, mode),
      context=STREAM_CONTEXT,
    ).result()
    for companion, path in given:
      attrs = {
        "classes": list(classes),
        ATTRIBUTE: {
          **common,
          "kind": companion.name,
          "labels": source_id(output),
          **companion.description,
        },
      }
      extra = (len(classes),) if companion.per_class else ()
      names = ("z", "y", "x", "class") if companion.per_class else ("z", "y", "x")
      opened[companion.name] = ts.open(
        _spec(path, (z, y, x, *extra), (*chunks, *extra), names, attrs, mode),
        context=STREAM_CONTEXT,
      ).result()
  except ValueError as e:
    raise OutputError(f"cannot create output arrays: {e}") from e
  markers = ts.KvStore.open(volume_lib.kvstore_spec(output), context=volume_lib.CONTEXT).result()
  done = set(plan.done) if plan.action == "resume" else set()
  if not may_delete:
    done = list_done(markers)
  return SegmentationOutput(
    labels=labels,
    probabilities=opened.get("probabilities"),
    done=done,
    _markers=markers,
    uncertainty=opened.get("uncertainty"),
  )


def disk_full_error(
  paths: Sequence[Any], done: int, done_pixels: int, remaining_pixels: int, per_pixel: int
):
  """The one-line error for a full disk. Finished blocks are kept (a rerun resumes them);
  the space still needed is extrapolated from what they took, or bounded by the raw size."""
  local = [volume_lib.local_path(p) for p in paths]
  written = sum(outputs.dir_size(p) for p in local if p is not None and os.path.exists(p))
  rate = written / done_pixels if done_pixels and written else per_pixel
  message = outputs.disk_full_message(
    "--output",
    volume_lib.describe(paths[0]),
    rate * remaining_pixels,
    "rest of the run",
    kept=f"The {done} finished blocks are kept (a rerun resumes after them); free some space",
  )
  return OutputError(message)
