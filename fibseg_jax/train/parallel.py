"""Devices, hosts and shardings: one `Mesh` over every device of every process.

The batch axis is sharded over the mesh axis 'data' and the train state is replicated.
Each process feeds only its own share of the global batch
(`jax.make_array_from_process_local_data`). `jax.pmap` is in maintenance mode in
current JAX and built on the same machinery, so nothing here uses it.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fibseg_jax.train.config import ConfigError

DATA_AXIS = "data"


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Starts multi-process JAX when asked for (flags) or when a cluster is detected.

  With no arguments this is a no-op on a single machine and auto-detects SLURM,
  Open MPI, Cloud TPU and other environments JAX knows. On CPU, cross-process
  collectives use gloo.
  """
  if coordinator_address or (num_processes and num_processes > 1):
    if not (coordinator_address and num_processes and process_id is not None):
      raise ConfigError(
        "--coordinator_address, --num_processes and --process_id must be given together "
        f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})"
      )
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id} must be in 0..{num_processes - 1}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
    )
    return
  try:
    from jax._src import clusters  # noqa: PLC0415 - only to probe auto-detection

    detected = any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types)
  except Exception:  # noqa: BLE001 - private API; without it, stay single-process
    detected = False
  if detected:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
  """(replicated, batch-sharded) shardings on `mesh`."""
  return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(local_batch: dict[str, np.ndarray], batch_sharding: NamedSharding):
  """Assembles each process's share into one global array per key (batch axis 0)."""
  return {
    k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
    for k, v in local_batch.items()
  }


def check_batch_size(batch_size: int, flag: str = "--config.train.batch_size") -> None:
  """The global batch must split evenly over devices and processes."""
  devices, processes = jax.device_count(), jax.process_count()
  if batch_size < 1 or batch_size % devices:
    raise ConfigError(
      f"{flag}={batch_size} must be a positive multiple of the device count ({devices}: "
      f"{jax.devices()[0].platform} x {jax.local_device_count()} on each of {processes} "
      f"process(es)); e.g. {max(devices, batch_size - batch_size % devices or devices)}"
    )
