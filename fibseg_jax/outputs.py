"""Where a command may write: nowhere but its own earlier outputs.

Every writer of the package (ingest, the synthetic stack, segment and its exports,
evaluate, suggest, the study, the sweep, the benchmark) claims its output path with
`claim` before it writes anything. The rules:

- The output must not be one of the run's inputs, nor contain one (`--out=data` with
  `--channel=ICE='data/ice/*.tif'` is refused): replacing it would delete them.
- Something already at the output path is replaced (or written into) only when it is
  an earlier output of the same kind, recognised by its own metadata: a volume's group
  attributes, a segmentation array's run record, an export's attribute, or, for the
  directories of files that evaluate, suggest, the study and the sweep write, the
  marker file `MARKER` holding the kind. `--overwrite` never widens this: it only says
  that an earlier output of the same kind may be replaced. An empty directory is free.
- Outputs are written into a hidden sibling (`partial_sibling`) and moved into place by
  `replace`, so an interruption never leaves half an output at the path; partial
  siblings left by a killed run are removed by the next run of the same command
  (`remove_stale_partials`), which says so.

This module imports nothing from the package, so every layer can use it.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

MARKER = ".fibseg-output.json"
_PARTIAL = ".partial-"
_OLD = ".replaced-"
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "file too large")


class OutputError(ValueError):
  """An output path that a command may not write: it is an input, holds one, or holds
  something the command did not write."""


def _real(path: str | os.PathLike) -> str:
  return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(child: str, parent: str) -> bool:
  """Whether `child` is `parent` or lies under it (both resolved)."""
  return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def glob_root(pattern: str) -> str:
  """The directory part of a glob before its first wildcard: 'data/ice/*.tif' -> 'data/ice'."""
  parts = []
  for part in os.fspath(pattern).split(os.sep):
    if glob.has_magic(part):
      break
    parts.append(part)
  root = os.sep.join(parts)
  if root == os.fspath(pattern):  # no wildcard: the path itself
    return root
  return root or "."


def input_paths(inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
  """(flag, resolved local path) of each input: files matched by globs, and the glob's root
  directory; non-local roots (memory://, gs://, dicts) are left out."""
  out = []
  for flag, value in inputs.items():
    values = value if isinstance(value, list | tuple) else [value]
    for v in values:
      if v is None or isinstance(v, Mapping):
        continue
      v = os.fspath(v)
      if "://" in v and not v.startswith("file://"):
        continue
      v = v[len("file://") :] if v.startswith("file://") else v
      if glob.has_magic(v):
        out += [(flag, _real(p)) for p in glob.glob(v)]
        out.append((flag, _real(glob_root(v))))
      else:
        out.append((flag, _real(v)))
  return out


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
  """The marker of a directory of outputs, or None."""
  try:
    with open(os.path.join(os.fspath(path), MARKER)) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  return marker if isinstance(marker, dict) else None


def marker_kind(path: str | os.PathLike) -> str | None:
  """The kind a directory's marker names, or None when it has none."""
  marker = read_marker(path)
  return str(marker.get("kind")) if marker else None


def write_marker(path: str | os.PathLike, kind: str, **info: Any) -> None:
  """Marks a directory as an output of `kind` (written by fibseg_jax)."""
  doc = {"kind": kind, "written_by": "fibseg_jax", **info}
  write_text(os.path.join(os.fspath(path), MARKER), json.dumps(doc, indent=1) + "\n")


def _describe_kind(kind: str) -> str:
  return {"volume": "fibseg volume"}.get(kind, f"fibseg {kind}")


def claim(
  path: Any,
  *,
  kind: str,
  flag: str,
  inputs: Mapping[str, Any] = {},
  is_own: Callable[[str], bool] | None = None,
  overwrite: bool = True,
  directory: bool = False,
  legacy: Sequence[str] = (),
) -> bool:
  """Checks that a command may write its output at `path`, before it writes anything.

  Args:
    path: the output (a local path; other roots are checked only against `inputs`).
    kind: what the command writes, e.g. "volume", "report", "suggest".
    flag: the flag that named `path`, for messages, e.g. "--out".
    inputs: flag -> input path(s) or glob(s) of the run.
    is_own: tells whether what is at a local path is an earlier output of this kind;
      default: the directory's `MARKER` names `kind`, or it holds one of `legacy`.
    overwrite: whether an earlier output of the same kind may be replaced (the
      directories of files are rewritten in place and pass True).
    directory: the output is a directory of files (evaluate, suggest, study, sweep):
      mark it as ours (`MARKER`) once claimed, creating it if needed.
    legacy: files by which a directory written before markers existed is recognised
      as this kind's (e.g. "study_config.json"); it gets the marker when claimed.

  Returns:
    True when an earlier output of this kind is at `path` (it will be replaced or
    updated), False when nothing (or an empty directory) is there.

  Raises:
    OutputError: `path` is or holds an input, holds something else, is our earlier
      output without `overwrite`, or its parent directory is missing.
  """
  where = os.fspath(path) if not isinstance(path, Mapping) else json.dumps(dict(path))
  if isinstance(path, Mapping) or ("://" in where and not where.startswith("file://")):
    return False  # object stores: the writers check their prefixes themselves
  local = where[len("file://") :] if where.startswith("file://") else where
  real = _real(local)
  for input_flag, input_path in input_paths(inputs):
    if input_path == real:
      raise OutputError(
        f"{flag}={where} is the input {input_flag}; write the output somewhere else"
      )
    if _inside(input_path, real):
      raise OutputError(
        f"{flag}={where} contains the input {input_flag} ({input_path}); writing there "
        "could delete it: choose an output path outside it"
      )
  parent = os.path.dirname(real)
  if not os.path.isdir(parent):
    raise OutputError(f"{flag}={where}: parent directory {parent} does not exist")
  if not os.path.lexists(local):
    if directory:
      os.mkdir(local)
      write_marker(local, kind)
    return False
  if os.path.isdir(local) and not os.path.islink(local) and not os.listdir(local):
    if directory:
      write_marker(local, kind)
    return False
  if is_own is not None:
    own = is_own(local)
  else:
    own = marker_kind(local) == kind or any(os.path.exists(os.path.join(local, f)) for f in legacy)
  if not own:
    what = "a file" if os.path.isfile(local) else "a directory"
    rule = (
      "fibseg writes only into a new or empty folder or its own earlier one"
      if directory
      else "fibseg replaces only its own outputs, with or without --overwrite"
    )
    raise OutputError(
      f"{flag}={where} exists and is {what} that is not a {_describe_kind(kind)} output "
      f"(no fibseg metadata of that kind); {rule}: choose a new path, or move it away "
      "yourself"
    )
  if not overwrite:
    raise OutputError(
      f"{flag}={where} already exists; pass --overwrite to replace it (it is an earlier "
      f"{_describe_kind(kind)} output)"
    )
  if directory:
    write_marker(local, kind)
  return True


def _host_tag() -> str:
  return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _owner_tag() -> str:
  """HOST-PID-RANDOM: who writes a partial (or replaced) sibling."""
  return f"{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def partial_sibling(path: str | os.PathLike) -> str:
  """A hidden, unique sibling of `path` to write into before `replace` moves it there.

  The name records the host and process (`.NAME.partial-HOST-PID-RANDOM`), so a later
  run can tell the partial output of a killed run from one still being written.
  """
  parent, name = os.path.split(os.path.abspath(os.fspath(path)))
  return os.path.join(
    parent, f".{name}{_PARTIAL}{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
  )


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _is_stale(sibling: str) -> bool:
  tag = os.path.basename(sibling).rpartition(_PARTIAL)[2]
  parts = tag.split("-")
  if len(parts) != 3 or not parts[1].isdigit():
    return True  # an older naming with no owner recorded; nothing writes those any more
  host, pid = parts[0], int(parts[1])
  if host != _host_tag():
    return False  # another machine's run may still be writing it
  return pid != os.getpid() and not _alive(pid)


def dir_size(path: str) -> int:
  """Bytes in the files under `path` (or of the file `path`)."""
  if os.path.isfile(path) or os.path.islink(path):
    return os.path.getsize(path) if os.path.isfile(path) else 0
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(root, f))
      except OSError:
        pass
  return total


def stale_partials(path: str | os.PathLike) -> list[str]:
  """Partial siblings of `path` (and replaced ones) that no running process writes."""
  parent, name = os.path.split(os.path.abspath(os.fspath(path)))
  found = []
  for pattern in (f".{name}{_PARTIAL}*", f".{name}{_OLD}*"):
    found += glob.glob(os.path.join(glob.escape(parent), pattern))
  return sorted(p for p in found if _is_stale(p))


def remove_stale_partials(
  path: str | os.PathLike, log: Callable[[str], None] | None = print
) -> list[tuple[str, int]]:
  """Removes what killed runs left next to `path`; says what it removed.

  Returns:
    (path, bytes) of each removed sibling.
  """
  removed = []
  for sibling in stale_partials(path):
    size = dir_size(sibling)
    if os.path.isdir(sibling) and not os.path.islink(sibling):
      shutil.rmtree(sibling, ignore_errors=True)
    else:
      try:
        os.remove(sibling)
      except OSError:
        pass
    removed.append((sibling, size))
    if log is not None:
      log(
        f"removed {sibling} ({format_bytes(size)}), the partial output of an interrupted "
        "earlier run"
      )
  return removed


def replace(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
  """Moves a finished `tmp` (file or directory) onto `final`, replacing what was there.

  The old `final` is first renamed aside, so at every moment `final` is either the old
  output or the new one, never a mixture; the old one is deleted last.
  """
  tmp, final = os.fspath(tmp), os.fspath(final)
  if not os.path.lexists(final):
    os.rename(tmp, final)
    return
  if os.path.isfile(final) or os.path.islink(final):
    os.replace(tmp, final)
    return
  parent, name = os.path.split(os.path.abspath(final))
  old = os.path.join(parent, f".{name}{_OLD}{_owner_tag()}")
  os.rename(final, old)
  os.rename(tmp, final)
  shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes a text file through a temporary sibling, so a crash never leaves half a file."""
  path = os.fspath(path)
  tmp = partial_sibling(path)
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (an OSError, or a tensorstore error) says the filesystem is full."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
      return True
    if any(text in str(e).lower() for text in _DISK_FULL_TEXT):
      return True
  return False


def _chain(error: BaseException) -> Iterable[BaseException]:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def free_bytes(path: str | os.PathLike) -> int | None:
  """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
  path = os.path.abspath(os.fspath(path))
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def format_bytes(n: float) -> str:
  """1536 -> '1.5 KB', in powers of 1024 with the usual names."""
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if abs(n) < 1024 or unit == "TB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TB"


def disk_full_message(
  flag: str,
  path: Any,
  needed_bytes: float | None,
  what: str,
  kept: str = "Nothing half-written was kept; free some space (or choose another path)",
) -> str:
  """The one line for a filesystem that filled up while writing `path` (each layer raises
  it as its own error type)."""
  where = os.fspath(path) if not isinstance(path, Mapping) else json.dumps(dict(path))
  free = free_bytes(where) if "://" not in where else None
  need = f"; the {what} needs about {format_bytes(needed_bytes)}" if needed_bytes else ""
  have = f", {format_bytes(free)} free now" if free is not None else ""
  return (
    f"{flag}={where}: no space left on the device{need}{have}. {kept} and rerun the same command"
  )
