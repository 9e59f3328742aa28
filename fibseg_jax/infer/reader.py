"""The slab regions of segmentation blocks, read in a background thread one block ahead
(the thread and queue are the training loader's: `fibseg_jax.data.reader.Prefetcher`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import tensorstore as ts

from fibseg_jax.data import reader as data_reader
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.infer import store, tiling
from fibseg_jax.infer.tiling import Block, RegionGeometry


class SlabReader:
  """Reads the slab region of each block in a background thread, one block ahead.

  Consecutive blocks of one region share slices, so slices of the current region are
  kept and only the missing ones are read; leaving a region drops them.

  Iterate to get (block, geometry, slab) with slab a list of `slices` arrays
  [region_y, region_x, channels] in the volume's dtype (shared, do not modify).
  """

  def __init__(
    self,
    volume: volume_lib.Volume,
    blocks: Sequence[Block],
    *,
    channel_indices: Sequence[int],
    slices: int,
    halo: int,
    tile: int,
    size_multiple: int,
    read_ahead: int = 1,
    min_tile: int = 0,
  ):
    self._volume = volume
    self._image = ts.open(
      {"driver": "zarr3", "kvstore": volume_lib.child_spec(volume.kvstore, "image")},
      open=True,
      context=store.STREAM_CONTEXT,
    ).result()
    self._blocks = list(blocks)
    self._channels = np.asarray(channel_indices)
    self._slices = slices
    self._halo = halo
    self._tile = tile
    self._multiple = size_multiple
    self._read_ahead = max(read_ahead, 1)
    self._min_tile = min_tile
    self._prefetch: data_reader.Prefetcher | None = None

  def _read_slices(self, zs: Sequence[int], geom: RegionGeometry) -> dict[int, ts.Future]:
    y_lo, y_hi = int(geom.y_index.min()), int(geom.y_index.max()) + 1
    x_lo, x_hi = int(geom.x_index.min()), int(geom.x_index.max()) + 1
    return {z: self._image[z, y_lo:y_hi, x_lo:x_hi].read() for z in zs}

  def _region(self, data: np.ndarray, geom: RegionGeometry) -> np.ndarray:
    ys = geom.y_index - geom.y_index.min()
    xs = geom.x_index - geom.x_index.min()
    # Inside the volume nothing is reflected: use the read as is, without a copy.
    if not (_is_range(ys, data.shape[0]) and _is_range(xs, data.shape[1])):
      data = data[np.ix_(ys, xs)]
    if not _is_range(self._channels, data.shape[2]):
      data = data[..., self._channels]
    return data

  def _slabs(self) -> Iterator[tuple[Block, RegionGeometry, list[np.ndarray]]]:
    cache: dict[int, np.ndarray] = {}
    region = geom = None
    for block in self._blocks:
      if block.region != region:
        # Blocks of one region share their footprint, hence their geometry.
        cache, region = {}, block.region
        geom = tiling.region_geometry(
          block,
          self._volume.shape[1:],
          halo=self._halo,
          tile=self._tile,
          size_multiple=self._multiple,
          min_tile=self._min_tile,
        )
      zs = [int(z) for z in tiling.slab_indices(block.z, self._slices, self._volume.shape[0])]
      futures = self._read_slices(sorted(set(zs) - set(cache)), geom)
      # Keep only what this block needs; the next block needs most of it again.
      cache = {z: a for z, a in cache.items() if z in zs}
      for z, f in futures.items():
        cache[z] = self._region(f.result(), geom)
      yield block, geom, [cache[z] for z in zs]

  def __iter__(self):
    # Started here, not in __init__: nothing is read before the loop asks for it.
    self._prefetch = data_reader.Prefetcher(
      None, self._slabs(), self._read_ahead, name="fibseg-slab-reader"
    )
    try:
      yield from self._prefetch
    finally:
      self.close()

  def close(self) -> None:
    if self._prefetch is not None:
      self._prefetch.close()


def _is_range(index: np.ndarray, n: int) -> bool:
  return len(index) == n and np.array_equal(index, np.arange(n))
