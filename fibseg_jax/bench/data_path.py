"""The data path: slab-loader reads against the volume's chunk shape, and test volumes."""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from fibseg_jax.bench import machine
from fibseg_jax.bench.options import CHANNELS, CLASSES, NUM_CLASSES, Options
from fibseg_jax.data import loader as loader_lib
from fibseg_jax.data import volume as volume_lib

# The loader reads the race configuration's slabs.
SLICES = 3


def read_amplification(patch: int, chunk: int) -> float:
  """Expected decoded pixels per patch pixel, for a patch at a uniformly random offset.

  Along one axis a patch of p pixels overlaps 1 + (p - 1) / c chunks of c on average.
  """
  per_axis = (1 + (patch - 1) / chunk) * chunk / patch
  return per_axis**2


def write_test_volume(root: str, shape: Sequence[int], chunk_yx: int, seed: int = 0) -> list[int]:
  """A uint16 (ICE, TLD) volume of blocky phases under noise; returns its annotated slices.

  The noise makes the chunks compress about as badly as real micrographs do.

  Args:
    root: where to write the zarr v3 volume.
    shape: (z, y, x).
    chunk_yx: chunk y-x size.
    seed: numpy seed.
  """
  z, y, x = shape
  rng = np.random.default_rng(seed)
  annotated = sorted({z // 4, z // 2, (3 * z) // 4} & set(range(z)))
  means = np.asarray([[3000, 9000], [12000, 15000], [20000, 16000], [30000, 31000]], np.float32)
  with volume_lib.create_volume(
    root,
    shape=shape,
    dtype="uint16",
    channels=CHANNELS,
    classes=CLASSES,
    voxel_size_nm=(20, 10, 10),
    chunk_yx=chunk_yx,
  ) as writer:
    for k in range(z):
      coarse = rng.integers(0, NUM_CLASSES, (math.ceil(y / 32), math.ceil(x / 32)))
      labels = np.repeat(np.repeat(coarse, 32, 0), 32, 1)[:y, :x].astype(np.uint8)
      image = means[labels] + rng.normal(0, 1500, (y, x, len(CHANNELS))).astype(np.float32)
      writer.write_slice(
        k, np.clip(image, 0, 65535).astype(np.uint16), labels if k in annotated else None
      )
    writer.commit()
  return annotated


def _uncached(vol: volume_lib.Volume) -> volume_lib.Volume:
  """The same volume opened without a chunk cache, so every read decodes its chunks."""
  context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})

  def reopen(name: str) -> ts.TensorStore:
    spec = {"driver": "zarr3", "kvstore": volume_lib.child_spec(vol.kvstore, name)}
    return ts.open(spec, context=context, open=True).result()

  return dataclasses.replace(vol, image=reopen("image"), labels=reopen("labels"))


def _directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _time_reads(loader: loader_lib.SlabLoader, batches: int) -> float:
  """Patches/s of synchronous `read(train_plan(step))` after one untimed batch."""
  loader.read(loader.train_plan(0))
  start = time.perf_counter()
  for step in range(1, batches + 1):
    loader.read(loader.train_plan(step))
  return batches * loader.config.batch_size / (time.perf_counter() - start)


def _full_recipe(config: loader_lib.LoaderConfig) -> loader_lib.LoaderConfig:
  """`config` with every part of `loader.RECIPE_PARTS` on."""
  fields = {k: v for part in loader_lib.RECIPE_PARTS.values() for k, v in part.items()}
  return dataclasses.replace(config, **fields)


def bench_data_path(options: Options, workdir: str) -> list[dict[str, Any]]:
  """Slab-loader throughput for each chunk y-x size, without and with a chunk cache.

  Reads are synchronous (no prefetch thread) with `workers` = cores, training augmentation
  on, patch = --size, batch = --batch, 3 slices of (ICE, TLD): one training batch's data.
  "uncached" opens the volume with no chunk cache, so every patch decodes every chunk it
  touches (what the chunk shape decides). "cached" uses the volume module's shared
  256 MiB cache as training does; it fills during the timed batches, so on a volume that
  fits in it the figure tends to the cost of cutting, casting and augmenting alone.

  Returns:
    One row per chunk size.
  """
  rows = []
  for chunk in options.loader_chunks:
    root = os.path.join(workdir, f"chunk{chunk}.zarr")
    load = machine.load_average()
    start = time.perf_counter()
    write_test_volume(root, options.loader_shape, chunk)
    write_s = time.perf_counter() - start
    config = loader_lib.LoaderConfig(
      channels=CHANNELS,
      slices=SLICES,
      patch=options.size,
      batch_size=options.batch,
      prefetch=0,
      workers=machine.usable_cores(),
    )
    vol = volume_lib.open_volume(root)
    row = {
      "chunk_yx": chunk,
      "loadavg_1min": load[0] if load else None,
      "write_s": write_s,
      "stored_mib": _directory_bytes(root) / machine.MIB,
      "read_amplification": read_amplification(options.size, min(chunk, *options.loader_shape[1:])),
    }
    with loader_lib.SlabLoader(_uncached(vol), config) as loader:
      row["patches_per_s_uncached"] = _time_reads(loader, options.loader_batches)
    # The same reads with every part of the augmentation recipe on at its measured
    # magnitudes and probabilities (`loader.RECIPE_PARTS`).
    with loader_lib.SlabLoader(_uncached(vol), _full_recipe(config)) as loader:
      row["patches_per_s_uncached_full_recipe"] = _time_reads(loader, options.loader_batches)
    with loader_lib.SlabLoader(vol, config) as loader:
      row["patches_per_s_cached"] = _time_reads(loader, options.loader_batches)
    print(
      f"  chunk {chunk}: {row['patches_per_s_uncached']:.1f} patches/s uncached "
      f"({row['patches_per_s_uncached_full_recipe']:.1f} with the full recipe), "
      f"{row['patches_per_s_cached']:.1f} cached",
      file=sys.stderr,
      flush=True,
    )
    rows.append(row)
    del vol
    gc.collect()
    shutil.rmtree(root, ignore_errors=True)
  return rows


def headroom_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The row loader headroom is read from: the volume store's default chunk, else the first."""
  for row in rows:
    if row["chunk_yx"] == volume_lib.DEFAULT_CHUNK_YX:
      return row
  return rows[0]
