"""Multi-host start-up: `jax.distributed.initialize` from the config or the environment.

On a TPU pod slice every worker runs the same command and jax finds the coordinator itself, so
`initialize()` takes no arguments; on GPU clusters the coordinator address, process count and process id come
from `config.distributed` or, where those are unset, from the environment (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID, or SLURM's / Open MPI's variables, which jax reads itself).
"""

from __future__ import annotations

import os

from absl import logging
import jax

from posjax.errors import ConfigError

MODES = ('auto', 'on', 'off')


def _cluster_in_environment() -> str:
  """The launcher whose variables say this is one of several processes ('' when none does)."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1 and 'SLURM_PROCID' in os.environ:
    return 'SLURM'
  if int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return 'Open MPI'
  return ''


def _env_int(name: str):
  v = os.environ.get(name, '')
  return int(v) if v.strip() else None


def initialize_args(dist) -> dict | None:
  """The keyword arguments for `jax.distributed.initialize` that `config.distributed` asks for, or None when
  this is a single-process run. Explicit config fields win over the environment."""
  mode = dist.initialize
  if mode not in MODES:
    raise ConfigError(f'distributed.initialize {mode!r} is not one of {", ".join(MODES)}')
  if mode == 'off':
    return None
  address = dist.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or None
  num = dist.num_processes if dist.num_processes > 0 else _env_int('JAX_NUM_PROCESSES')
  pid = dist.process_id if dist.process_id >= 0 else _env_int('JAX_PROCESS_ID')
  if mode == 'auto' and not dist.coordinator_address and not _cluster_in_environment():
    return None
  if address and (num is None) != (pid is None):
    raise ConfigError(f'distributed: give both num_processes and process_id with coordinator {address!r} '
                      f'(got {num}, {pid}), or neither to let jax read them from SLURM/Open MPI')
  if num is not None and pid is not None and not 0 <= pid < num:
    raise ConfigError(f'distributed.process_id ({pid}) must be in [0, num_processes={num})')
  # Unset values stay None: jax's cluster detection (TPU metadata, SLURM, Open MPI) fills them in.
  return {k: v for k, v in dict(coordinator_address=address, num_processes=num, process_id=pid).items()
          if v is not None}


def initialize(config) -> None:
  """Joins this process to the others (once; a no-op for single-process runs) and quiets the logs of every
  process but 0, which alone writes metrics and logs progress. Call before anything touches a device."""
  args = initialize_args(config.distributed)
  if args is None:
    return
  if not jax.distributed.is_initialized():
    jax.distributed.initialize(**args)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info('process %d of %d; %d local and %d global devices', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def everyone(fn, what: str):
  """fn()'s result here; on several processes, then a barrier at which every process learns whether fn failed
  anywhere: where it did, its own error is raised, elsewhere a ConfigError naming those processes. Without it
  the others would wait at their next collective for ever, for a process that is gone. For work that one
  process does for all (`lambda: jax.process_index() == 0 and ...`) or that each does a share of."""
  if jax.process_count() == 1:
    return fn()
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  result, error = None, None
  try:
    result = fn()
  except Exception as e:  # pylint: disable=broad-except  (raised below, once every process knows)
    error = e
  failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
  if error is not None:
    raise error
  if failed.any():
    raise ConfigError(f'{what} failed on process(es) {", ".join(map(str, np.flatnonzero(failed)))} (their logs '
                      'say why)')
  return result
