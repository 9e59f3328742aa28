r"""Speed and memory race: fibseg_jax against MONAI's BasicUNet in PyTorch, in one process.

  make bench   # pip install torch==2.13.0 monai==1.6.1 psutil, then this script
  python experiments/benchmark.py --batch=8 --size=256 --steps=20 --out=bench.json
  python experiments/benchmark.py --model=sensor3d --peer=none --which=train,infer
  python experiments/benchmark.py --dtype=bfloat16 --which=train,infer

Both sides get the same random data (numpy, then converted), the same network
(`models.default_config("unet")` is BasicUNet's layout and parameter count), the same
loss terms (cross-entropy + pooled soft Dice), the same optimizer (AdamW, global-norm
clipping at 1) and the same global batch. Measured for each framework:

  train  the whole step (forward, loss, backward, update): median step time after
         `--warmup` steps, patches/s and Mpixel/s (output pixels of the central slice),
         and the time of the first step (for JAX: trace + compile + run).
  infer  forward pass only (JAX `train=False`; torch `eval()` + `inference_mode`).
  data   (fibseg_jax only) slab-loader reads from a generated local volume, one per chunk
         y-x size, with and without tensorstore's chunk cache.

Every step is synchronised before its clock stops (`block_until_ready`;
`torch.cuda.synchronize()` on GPU). Memory: on GPU the devices' own peak counters; on CPU
the growth of the process's resident set over each phase, sampled in a thread. Two
frameworks share one process, and freed memory goes back to the allocator rather than to
the system, so CPU figures are indicative only; JAX is measured first.

The peer is optional: with --peer=none, or when torch and monai do not import, only
fibseg_jax is measured and the output says why.
"""

from __future__ import annotations

import os

# Before jax is imported: on GPU, do not let XLA take 75% of the memory torch needs too.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import contextlib
import dataclasses
import gc
import importlib
import importlib.metadata
import json
import math
import platform
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from fibseg_jax import models
from fibseg_jax.data import loader as loader_lib
from fibseg_jax.data import volume as volume_lib
from fibseg_jax.train import config as config_lib
from fibseg_jax.train import parallel
from fibseg_jax.train import state as state_lib

try:
  import psutil
except ImportError:  # resource's lifetime peak is the fallback
  psutil = None

PHASES = ("train", "infer", "data")
CHANNELS = ("ICE", "TLD")
NUM_CLASSES = 4
MIB = 1 << 20


class BenchmarkError(ValueError):
  """A benchmark option that cannot work; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Options:
  """What to measure; one field per command-line flag.

  Attributes:
    batch: global batch, the same for both frameworks.
    size: y = x of a patch in pixels.
    slices: slices per slab (x 2 channels = input features of the 2.5D U-Net).
    steps: timed steps after the warm-up.
    warmup: untimed steps first (the first of them is the compile).
    which: phases to run, a subset of `PHASES`.
    peer: "monai" or "none".
    dtype: compute dtype of the JAX model (and torch autocast dtype): float32 or bfloat16.
    model: "unet" or "sensor3d" (sensor3d has no peer).
    torch_threads: torch intra-op threads; 0 = the cores this process may use.
    loader_shape: (z, y, x) of the generated volume of the data-path section.
    loader_chunks: chunk y-x sizes to compare.
    loader_batches: timed batches per chunk size and cache setting.
    model_overrides: fields that replace the model's defaults (tests shrink the net).
  """

  batch: int = 8
  size: int = 256
  slices: int = 3
  steps: int = 20
  warmup: int = 3
  which: tuple[str, ...] = PHASES
  peer: str = "monai"
  dtype: str = "float32"
  model: str = "unet"
  torch_threads: int = 0
  loader_shape: tuple[int, int, int] = (8, 2048, 2048)
  loader_chunks: tuple[int, ...] = (128, 256, 512)
  loader_batches: int = 10
  model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


def check_options(options: Options) -> None:
  """Fails before anything is compiled or written, naming the flag and what it expects.

  Raises:
    BenchmarkError: an option out of range.
  """
  for name, minimum in (("batch", 1), ("size", 1), ("slices", 1), ("steps", 1), ("warmup", 1)):
    value = getattr(options, name)
    if value < minimum:
      raise BenchmarkError(f"--{name}={value}: must be an integer >= {minimum}")
  unknown = sorted(set(options.which) - set(PHASES))
  if unknown or not options.which:
    raise BenchmarkError(f"--which={','.join(options.which)}: expected some of {','.join(PHASES)}")
  if options.slices % 2 == 0:
    raise BenchmarkError(f"--slices={options.slices}: must be odd")
  if options.batch % jax.device_count():
    raise BenchmarkError(
      f"--batch={options.batch} must be a multiple of the device count ({jax.device_count()})"
    )
  try:
    models.check_input_shape(model_config(options), options.slices, options.size, options.size)
  except models.InputShapeError as e:
    raise BenchmarkError(f"--size={options.size}: {e}") from None
  if "data" in options.which:
    z, y, x = options.loader_shape
    if min(y, x) < options.size or z < 1:
      raise BenchmarkError(
        f"--loader_shape={z},{y},{x}: y and x must be at least --size={options.size}"
      )
    if not options.loader_chunks or min(options.loader_chunks) < 1:
      raise BenchmarkError(f"--loader_chunks={options.loader_chunks}: positive sizes expected")


def model_config(options: Options) -> dict[str, Any]:
  """The model's default config with the benchmark's class count, dtype and overrides."""
  config = models.default_config(options.model)
  config.update(num_classes=NUM_CLASSES, dtype=options.dtype, **options.model_overrides)
  return config


# Environment.


def load_average() -> list[float]:
  """1, 5 and 15 minute load averages of the machine (shared machines: read with care)."""
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return []


def usable_cores() -> int:
  """Cores this process may run on (affinity), not the machine's total."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _version(distribution: str) -> str:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def environment() -> dict[str, Any]:
  """Command line, versions and JAX's devices."""
  devices = jax.devices()
  return {
    "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    "versions": {
      "python": platform.python_version(),
      **{
        name: _version(name) for name in ("jax", "jaxlib", "flax", "optax", "numpy", "tensorstore")
      },
    },
    "host": {
      "platform": platform.platform(),
      "processor": platform.processor(),
      "cores": usable_cores(),
    },
    "jax_device": {
      "backend": jax.default_backend(),
      "devices": [str(d) for d in devices],
      "device_kind": devices[0].device_kind,
      # XLA:CPU runs ops on one intra-op pool sized to the machine; it has no public knob.
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
    },
  }


# Memory.


class MemoryMeter:
  """Peak memory of one phase: device counters on GPU, sampled resident set on CPU.

  Use as a context manager around the phase; `result()` afterwards.

  Args:
    device_peak: returns the device's peak bytes (after resetting it where the framework
      can), or None where the device keeps no such counter (CPU).
    interval_s: how often the resident set is sampled.
  """

  def __init__(
    self, device_peak: Callable[[], int | None] | None = None, interval_s: float = 0.005
  ):
    self._device_peak = device_peak
    self._interval = interval_s
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._start = self._peak = self._end = 0
    self._maxrss_start = 0
    self._process = psutil.Process() if psutil is not None else None

  def rss(self) -> int:
    """Current resident set in bytes (0 without psutil)."""
    return self._process.memory_info().rss if self._process is not None else 0

  @staticmethod
  def maxrss() -> int:
    """Lifetime peak resident set of the process in bytes (ru_maxrss is KiB on Linux)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

  def _sample(self) -> None:
    while not self._stop.wait(self._interval):
      self._peak = max(self._peak, self.rss())

  def __enter__(self) -> MemoryMeter:
    gc.collect()
    self._start = self._peak = self.rss()
    self._maxrss_start = self.maxrss()
    if psutil is not None:
      self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    self._end = self.rss()
    self._peak = max(self._peak, self._end)

  def result(self) -> dict[str, Any]:
    """Figures in MiB; `peak_mib` is the one the table shows."""
    device = self._device_peak() if self._device_peak is not None else None
    if device is not None:
      return {"kind": "device peak", "peak_mib": device / MIB}
    if psutil is None:
      # Only the lifetime peak is known: its growth during the phase, if any.
      growth = max(self.maxrss() - self._maxrss_start, 0)
      return {"kind": "process maxrss growth", "peak_mib": growth / MIB}
    return {
      "kind": "RSS growth",
      "peak_mib": (self._peak - self._start) / MIB,
      "rss_start_mib": self._start / MIB,
      "rss_peak_mib": self._peak / MIB,
      "rss_end_mib": self._end / MIB,
    }


def jax_device_peak() -> int | None:
  """Largest `peak_bytes_in_use` over the local devices, or None on CPU.

  JAX cannot reset the counter, so it is the process's peak so far, not the phase's.
  """
  stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
  return max(peaks) if peaks else None


# Timing.


def time_steps(step: Callable[[], Any], sync: Callable[[Any], Any], steps: int, warmup: int):
  """Runs `warmup` then `steps` calls of `step`, each synchronised before its clock stops.

  Returns:
    {"first_step_s": the first call, "step_s": [timed calls], "step_s_median": ...}.
  """
  times = []
  for _ in range(warmup + steps):
    start = time.perf_counter()
    sync(step())
    times.append(time.perf_counter() - start)
  timed = times[warmup:]
  return {
    "first_step_s": times[0],
    "warmup_s": times[:warmup],
    "step_s": timed,
    "step_s_median": statistics.median(timed),
    "step_s_min": min(timed),
    "step_s_max": max(timed),
  }


def throughput(timing: dict[str, Any], batch: int, size: int) -> dict[str, float]:
  """Patches/s and Mpixel/s (output pixels) at the median step time."""
  step = timing["step_s_median"]
  return {"patches_per_s": batch / step, "mpixel_per_s": batch * size * size / step / 1e6}


# Data: the same random batch for both frameworks.


def make_batch(options: Options, seed: int = 0) -> dict[str, np.ndarray]:
  """A random slab batch and labels (no 255s: every pixel counts in both losses).

  Returns:
    {"image": float32 [batch, slices, y, x, channels], "labels": int32 [batch, y, x]}.
  """
  rng = np.random.default_rng(seed)
  b, s, p = options.batch, options.slices, options.size
  return {
    "image": rng.standard_normal((b, s, p, p, len(CHANNELS)), dtype=np.float32),
    "labels": rng.integers(0, NUM_CLASSES, (b, p, p), dtype=np.int32),
  }


def as_features_first(image: np.ndarray) -> np.ndarray:
  """[batch, slices, y, x, channels] -> [batch, slices * channels, y, x], slice-major.

  The feature order of fibseg_jax's 2.5D U-Net (feature s * channels + c), laid out as
  PyTorch's NCHW.
  """
  b, s, y, x, c = image.shape
  return np.ascontiguousarray(image.transpose(0, 1, 4, 2, 3).reshape(b, s * c, y, x))


# fibseg_jax.


def init_key(seed: int = 0) -> jax.Array:
  """The key the parameters are drawn from: the same initializers, another bit generator.

  XLA:CPU is slow to compile a whole network's threefry draws (38 s for a U-Net with two
  poolings and features (4, 8, 8) on the 2-core build machine); the "rbg" generator
  compiles about 6x faster,
  and the step being timed does not depend on which bits the weights got.
  """
  return jax.random.key(seed, impl="rbg")


def _jax_config(options: Options):
  config = config_lib.base_config()
  config.train.steps = options.warmup + options.steps
  config.train.warmup_steps = 1
  return config


def bench_jax_train(options: Options, batch: dict[str, np.ndarray]) -> dict[str, Any]:
  """The training step of `experiments/train.py`: jitted over a mesh, state donated.

  Args:
    options: the shapes, steps and model.
    batch: `make_batch` output.

  Returns:
    Parameter count, step times, throughput, last loss and memory of the phase.
  """
  model = models.build(model_config(options))
  config = _jax_config(options)
  mesh = parallel.make_mesh()
  replicated, batch_sharding = parallel.shardings(mesh)
  tx, schedule = state_lib.make_optimizer(config)
  sample = jnp.zeros((1, *batch["image"].shape[1:]), jnp.float32)
  init = lambda r: state_lib.create_state(model, tx, r, sample)  # noqa: E731
  rng = init_key()
  state_sharding = jax.tree.map(lambda _: replicated, jax.eval_shape(init, rng))
  with MemoryMeter(jax_device_peak) as meter:
    state = jax.jit(init, out_shardings=state_sharding)(rng)
    params = models.count_params(state.params)
    train_step, _ = state_lib.jit_steps(
      state_lib.make_train_step(model, tx, schedule, None, float(config.train.dice_weight)),
      state_lib.make_eval_step(model, NUM_CLASSES, None, float(config.train.dice_weight)),
      state_sharding,
      batch_sharding,
    )
    device_batch = jax.device_put(batch, batch_sharding)
    holder = {"state": state}

    def step():
      holder["state"], metrics = train_step(holder["state"], device_batch)
      return holder["state"], metrics

    timing = time_steps(step, jax.block_until_ready, options.steps, options.warmup)
    loss = float(jax.device_get(step()[1]["loss"]))
  return {
    "params": params,
    **timing,
    **throughput(timing, options.batch, options.size),
    "final_loss": loss,
    "memory": meter.result(),
  }


def bench_jax_infer(options: Options, batch: dict[str, np.ndarray]) -> dict[str, Any]:
  """The forward pass with `train=False`, jitted, batch sharded over the mesh.

  Args:
    options: the shapes, steps and model.
    batch: `make_batch` output; only the image is used.

  Returns:
    Step times, throughput and memory of the phase.
  """
  model = models.build(model_config(options))
  mesh = parallel.make_mesh()
  _, batch_sharding = parallel.shardings(mesh)
  with MemoryMeter(jax_device_peak) as meter:
    image = jax.device_put(batch["image"], batch_sharding)
    sample = jnp.zeros((1, *batch["image"].shape[1:]), jnp.float32)
    variables = jax.jit(lambda r: model.init(r, sample, train=False))(init_key())
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    timing = time_steps(
      lambda: forward(variables, image), jax.block_until_ready, options.steps, options.warmup
    )
  return {
    **timing,
    **throughput(timing, options.batch, options.size),
    "memory": meter.result(),
  }


# The PyTorch peer.


@dataclasses.dataclass(frozen=True)
class Peer:
  """The imported peer, or why there is none.

  Attributes:
    torch: the torch module, or None.
    monai: the monai module, or None.
    note: why the peer is not measured ("" when it is).
  """

  torch: Any = None
  monai: Any = None
  note: str = ""

  @property
  def available(self) -> bool:
    return self.torch is not None and self.monai is not None


def load_peer(options: Options, importer: Callable[[str], Any] = importlib.import_module) -> Peer:
  """Imports torch and monai when the options ask for the peer.

  Args:
    options: --peer and --model decide whether there is a peer to race.
    importer: imports a module by name (tests pass one that fails).

  Returns:
    A `Peer`; when torch or monai is missing its note says how to install them, and the
    benchmark goes on with fibseg_jax alone.
  """
  if options.peer == "none":
    return Peer(note="--peer=none: fibseg_jax only")
  if options.model != "unet":
    return Peer(note=f"--model={options.model} has no MONAI peer: fibseg_jax only")
  try:
    torch = importer("torch")
    monai = importer("monai")
    importer("monai.networks.nets")
    importer("monai.losses")
  except ImportError as e:
    return Peer(
      note=(
        f"--peer=monai: cannot import the peer ({e}); measuring fibseg_jax only. Install it "
        "with `.venv/bin/pip install torch==2.13.0 monai==1.6.1 psutil` (or run `make bench`)"
      )
    )
  return Peer(torch=torch, monai=monai)


def torch_setup(peer: Peer, options: Options) -> dict[str, Any]:
  """Chooses the torch device and threads; returns their description."""
  torch = peer.torch
  threads = options.torch_threads or usable_cores()
  torch.set_num_threads(threads)
  cuda = torch.cuda.is_available()
  if cuda:
    # Fixed shapes: let cuDNN pick its algorithms, as XLA autotunes its own.
    torch.backends.cudnn.benchmark = True
  return {
    "device": "cuda" if cuda else "cpu",
    "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
    "threads": torch.get_num_threads(),
    "interop_threads": torch.get_num_interop_threads(),
    "mkldnn": bool(torch.backends.mkldnn.is_available()),
  }


def _torch_net(peer: Peer, options: Options, device: str):
  features = tuple(model_config(options)["features"])
  return peer.monai.networks.nets.BasicUNet(
    spatial_dims=2,
    in_channels=options.slices * len(CHANNELS),
    out_channels=NUM_CLASSES,
    features=features,
  ).to(device)


def _torch_sync(peer: Peer, device: str) -> Callable[[Any], Any]:
  torch = peer.torch
  if device == "cuda":
    return lambda _: torch.cuda.synchronize()
  return lambda _: None  # CPU ops return when done


def _torch_peak(peer: Peer, device: str) -> Callable[[], int | None] | None:
  torch = peer.torch
  if device != "cuda":
    return None
  torch.cuda.reset_peak_memory_stats()
  return torch.cuda.max_memory_allocated


def _autocast(peer: Peer, options: Options, device: str):
  if options.dtype == "float32":
    return contextlib.nullcontext()
  return peer.torch.autocast(device_type=device, dtype=getattr(peer.torch, options.dtype))


def bench_torch_train(
  peer: Peer, options: Options, batch: dict[str, np.ndarray], device: str
) -> dict[str, Any]:
  """BasicUNet, MONAI DiceCELoss, AdamW and clipping, as a MONAI user would write it.

  Args:
    peer: the imported torch and monai.
    options: the shapes, steps and dtype (bfloat16: autocast).
    batch: `make_batch` output, converted to NCHW features.
    device: "cpu" or "cuda".

  Returns:
    Parameter count, step times, throughput, last loss and memory of the phase.
  """
  torch = peer.torch
  torch.manual_seed(0)
  sync = _torch_sync(peer, device)
  with MemoryMeter(_torch_peak(peer, device)) as meter:
    net = _torch_net(peer, options, device).train()
    params = sum(p.numel() for p in net.parameters())
    loss_fn = peer.monai.losses.DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    image = torch.from_numpy(as_features_first(batch["image"])).to(device)
    labels = torch.from_numpy(batch["labels"][:, None].astype(np.int64)).to(device)

    def step():
      optimizer.zero_grad(set_to_none=True)
      with _autocast(peer, options, device):
        logits = net(image)
      loss = loss_fn(logits.float(), labels)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
      optimizer.step()
      return loss

    timing = time_steps(step, sync, options.steps, options.warmup)
    loss = float(step().detach())
  return {
    "params": params,
    **timing,
    **throughput(timing, options.batch, options.size),
    "final_loss": loss,
    "memory": meter.result(),
  }


def bench_torch_infer(
  peer: Peer, options: Options, batch: dict[str, np.ndarray], device: str
) -> dict[str, Any]:
  """BasicUNet forward in `eval()` mode under `torch.inference_mode()`.

  Args:
    peer: the imported torch and monai.
    options: the shapes, steps and dtype.
    batch: `make_batch` output; only the image is used.
    device: "cpu" or "cuda".

  Returns:
    Step times, throughput and memory of the phase.
  """
  torch = peer.torch
  torch.manual_seed(0)
  sync = _torch_sync(peer, device)
  with MemoryMeter(_torch_peak(peer, device)) as meter:
    net = _torch_net(peer, options, device).eval()
    image = torch.from_numpy(as_features_first(batch["image"])).to(device)

    def forward():
      with torch.inference_mode(), _autocast(peer, options, device):
        return net(image)

    timing = time_steps(forward, sync, options.steps, options.warmup)
  return {
    **timing,
    **throughput(timing, options.batch, options.size),
    "memory": meter.result(),
  }


# Data path: slab-loader reads against the volume's chunk shape.


def read_amplification(patch: int, chunk: int) -> float:
  """Expected decoded pixels per patch pixel, for a patch at a uniformly random offset.

  Along one axis a patch of p pixels overlaps 1 + (p - 1) / c chunks of c on average.
  """
  per_axis = (1 + (patch - 1) / chunk) * chunk / patch
  return per_axis**2


def write_test_volume(root: str, shape: Sequence[int], chunk_yx: int, seed: int = 0) -> list[int]:
  """A uint16 two-channel volume of blocky phases under noise; returns its annotated slices.

  The noise makes the chunks compress about as badly as real micrographs do.
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
    classes=("pore", "csh", "portlandite", "clinker"),
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


def bench_data_path(options: Options, workdir: str) -> list[dict[str, Any]]:
  """Slab-loader throughput for each chunk y-x size, without and with a chunk cache.

  Reads are synchronous (no prefetch thread) with `workers` = cores, training augmentation
  on, patch = --size, batch = --batch: the cost of one training batch's data.
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
    load = load_average()
    start = time.perf_counter()
    write_test_volume(root, options.loader_shape, chunk)
    write_s = time.perf_counter() - start
    config = loader_lib.LoaderConfig(
      channels=CHANNELS,
      slices=options.slices,
      patch=options.size,
      batch_size=options.batch,
      prefetch=0,
      workers=usable_cores(),
    )
    vol = volume_lib.open_volume(root)
    row = {
      "chunk_yx": chunk,
      "loadavg_1min": load[0] if load else None,
      "write_s": write_s,
      "stored_mib": _directory_bytes(root) / MIB,
      "read_amplification": read_amplification(options.size, min(chunk, *options.loader_shape[1:])),
    }
    with loader_lib.SlabLoader(_uncached(vol), config) as loader:
      row["patches_per_s_uncached"] = _time_reads(loader, options.loader_batches)
    with loader_lib.SlabLoader(vol, config) as loader:
      row["patches_per_s_cached"] = _time_reads(loader, options.loader_batches)
    rows.append(row)
    del vol
    gc.collect()
    shutil.rmtree(root, ignore_errors=True)
  return rows


# The run.


def _measure(framework: str, phase: str, bench: Callable[..., dict[str, Any]], *args):
  """Runs one phase with the load average at its start; reports it on stderr."""
  load = load_average()
  print(f"{framework} {phase}: running (load average {load})", file=sys.stderr, flush=True)
  result = {"loadavg_1min": load[0] if load else None, **bench(*args)}
  gc.collect()
  print(
    f"{framework} {phase}: first step {result['first_step_s']:.2f} s, median step "
    f"{result['step_s_median'] * 1e3:.1f} ms, {result['patches_per_s']:.2f} patches/s",
    file=sys.stderr,
    flush=True,
  )
  return result


def run(
  options: Options, importer: Callable[[str], Any] = importlib.import_module
) -> dict[str, Any]:
  """Every measurement the options ask for.

  Args:
    options: see `Options`.
    importer: how the peer is imported (see `load_peer`).

  Returns:
    The results: environment, per-framework phases, data path, notes.

  Raises:
    BenchmarkError: see `check_options`.
  """
  check_options(options)
  result = environment()
  result["options"] = {
    k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()
  }
  result["load_average"] = {"start": load_average()}
  result["model"] = {
    "config": model_config(options),
    "input": f"[{options.batch}, {options.slices}, {options.size}, {options.size}, "
    f"{len(CHANNELS)}] -> logits [{options.batch}, {options.size}, {options.size}, "
    f"{NUM_CLASSES}]",
  }
  notes = []
  peer = load_peer(options, importer)
  if peer.note:
    notes.append(peer.note)
    print(f"note: {peer.note}", file=sys.stderr)
  batch = make_batch(options)
  frameworks: dict[str, dict[str, Any]] = {"fibseg_jax": {}}
  # JAX first, so its CPU memory figures are not blurred by torch's allocations.
  for phase, bench in (("train", bench_jax_train), ("infer", bench_jax_infer)):
    if phase in options.which:
      frameworks["fibseg_jax"][phase] = _measure("fibseg_jax", phase, bench, options, batch)
  if peer.available and ({"train", "infer"} & set(options.which)):
    device = torch_setup(peer, options)
    result["versions"]["torch"] = peer.torch.__version__
    result["versions"]["monai"] = peer.monai.__version__
    result["torch_device"] = device
    frameworks["monai"] = {}
    for phase, bench in (("train", bench_torch_train), ("infer", bench_torch_infer)):
      if phase in options.which:
        frameworks["monai"][phase] = _measure(
          "monai", phase, bench, peer, options, batch, device["device"]
        )
    notes.append(
      "peer loss: MONAI DiceCELoss(softmax, to_onehot_y, batch=True) averages Dice over "
      "every class, fibseg_jax over the classes present; the random labels hold all of them"
    )
    if options.dtype != "float32":
      notes.append(f"peer computes under torch.autocast({options.dtype}), params float32")
  result["frameworks"] = frameworks
  if jax.default_backend() == "cpu":
    notes.append(
      "CPU memory is the growth of the process's resident set during each phase, both "
      "frameworks in one process: indicative only (freed memory is reused, not returned)"
    )
  else:
    notes.append("JAX device peak is the process's peak so far (no reset): infer includes train's")
  if "data" in options.which:
    print("data path: running", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="fibseg-bench-") as workdir:
      result["data_path"] = bench_data_path(options, workdir)
  result["load_average"]["end"] = load_average()
  result["notes"] = notes
  return result


def markdown(result: dict[str, Any]) -> str:
  """The figures as markdown tables: one row per framework and phase, one per chunk size."""
  options = result["options"]
  lines = [
    f"{options['model']} {options['dtype']}, batch {options['batch']} x {options['slices']} "
    f"slices x {options['size']}^2 x {len(CHANNELS)} channels, {options['steps']} timed steps "
    f"after {options['warmup']}; JAX on {result['jax_device']['device_kind']}"
    + (
      f", torch on {result['torch_device']['device']} ({result['torch_device']['threads']} threads)"
      if "torch_device" in result
      else ""
    )
    + f"; load average {result['load_average']['start']} -> {result['load_average']['end']}",
    "",
    "| framework | phase | first step (s) | median step (ms) | patches/s | Mpixel/s "
    "| peak memory (MiB) | memory measure | load 1 min |",
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
  ]
  for name, phases in result["frameworks"].items():
    for phase, r in phases.items():
      lines.append(
        f"| {name} | {phase} | {r['first_step_s']:.2f} | {r['step_s_median'] * 1e3:.1f} "
        f"| {r['patches_per_s']:.2f} | {r['mpixel_per_s']:.3f} | {r['memory']['peak_mib']:.0f} "
        f"| {r['memory']['kind']} | {r['loadavg_1min']} |"
      )
  if result.get("data_path"):
    z, y, x = options["loader_shape"]
    lines += [
      "",
      f"Slab loader, volume {z} x {y} x {x} x {len(CHANNELS)} uint16 (zstd 1), patch "
      f"{options['size']}, {options['slices']} slices, batch {options['batch']}:",
      "",
      "| chunk y-x | stored (MiB) | read amplification | patches/s uncached "
      "| patches/s 256 MiB cache | load 1 min |",
      "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["data_path"]:
      lines.append(
        f"| {r['chunk_yx']} | {r['stored_mib']:.0f} | {r['read_amplification']:.2f} "
        f"| {r['patches_per_s_uncached']:.1f} | {r['patches_per_s_cached']:.1f} "
        f"| {r['loadavg_1min']} |"
      )
  if result.get("notes"):
    lines += ["", *(f"- {n}" for n in result["notes"])]
  return "\n".join(lines)


def _ints(values: Sequence[str], flag: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise BenchmarkError(
      f"--{flag}={','.join(values)}: expected comma-separated integers"
    ) from None


def define_flags():
  """The command line; defined only when run as a script, so tests can import this file."""
  from absl import flags  # noqa: PLC0415

  flags.DEFINE_integer("batch", 8, "Global batch, the same for both frameworks.")
  flags.DEFINE_integer("size", 256, "y = x of a patch in pixels.")
  flags.DEFINE_integer("slices", 3, "Slices per slab; x 2 channels = U-Net input features.")
  flags.DEFINE_integer("steps", 20, "Timed steps (median reported).")
  flags.DEFINE_integer("warmup", 3, "Untimed steps first; the first one compiles.")
  flags.DEFINE_list("which", list(PHASES), f"Phases to run, some of {','.join(PHASES)}.")
  flags.DEFINE_enum("peer", "monai", ["monai", "none"], "PyTorch peer to race.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
  flags.DEFINE_enum("model", "unet", list(models.MODELS), "fibseg_jax model.")
  flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads; 0 = usable cores.")
  flags.DEFINE_list("loader_shape", ["8", "2048", "2048"], "z,y,x of the data-path volume.")
  flags.DEFINE_list("loader_chunks", ["128", "256", "512"], "Chunk y-x sizes to compare.")
  flags.DEFINE_integer("loader_batches", 10, "Timed batches per chunk size and cache mode.")
  flags.DEFINE_string("out", "", "Write every figure to this JSON file.")
  return flags.FLAGS


def main(argv: list[str]) -> None:
  from absl import flags  # noqa: PLC0415

  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  try:
    shape = _ints(f.loader_shape, "loader_shape")
    if len(shape) != 3:
      raise BenchmarkError(f"--loader_shape={','.join(f.loader_shape)}: expected z,y,x")
    options = Options(
      batch=f.batch,
      size=f.size,
      slices=f.slices,
      steps=f.steps,
      warmup=f.warmup,
      which=tuple(f.which),
      peer=f.peer,
      dtype=f.dtype,
      model=f.model,
      torch_threads=f.torch_threads,
      loader_shape=shape,
      loader_chunks=_ints(f.loader_chunks, "loader_chunks"),
      loader_batches=f.loader_batches,
    )
    if f.out and not os.path.isdir(os.path.dirname(os.path.abspath(f.out))):
      raise BenchmarkError(f"--out={f.out}: its directory does not exist")
    result = run(options)
  except BenchmarkError as e:
    sys.exit(f"error: {e}")
  print(markdown(result))
  if f.out:
    with open(f.out, "w") as file:
      json.dump(result, file, indent=1)
    print(f"\nwrote {f.out}")


def _main() -> None:
  from absl import app  # noqa: PLC0415

  define_flags()
  app.run(main)


if __name__ == "__main__":
  _main()
