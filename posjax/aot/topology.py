"""TPU generations and slice names -> compile-only TPU devices (libtpu's topology descriptions), on any host.

    chip, devices = topology.devices('v5e-64', num_slices=2)   # 128 TPU v5e devices, 64 per slice

Slice names follow Cloud TPU: `v5e-N` / `v5litepod-N` and `v6e-N` count chips, `v4-N` and `v5p-N` count
TensorCores (two per chip, one device per chip as megacore). A topology can also be named by its chip grid,
`v5e:4x8` or `v4:2x2x4`. Chip figures are Google's published ones (Cloud TPU system architecture pages):
HBM per chip, peak bf16 FLOP/s, HBM bandwidth, and the ICI bandwidth of a chip over all its links.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from posjax.errors import ConfigError

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # what slice names start with: v4, v5e, v5p, v6e
  device_kind: str  # jax's Device.device_kind for it
  hbm_bytes: int
  peak_flops: float  # bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s per chip, all links together
  torus_dims: int  # 3: v4/v5p (AxBxC), 2: v5e/v6e (AxB)
  cores_per_chip: int  # TensorCores a slice name counts per chip
  chip_config: str  # libtpu's chip configuration: megacore gives one device per two-core chip
  sizes: tuple[int, ...]  # chip counts of the slice names Cloud TPU offers


CHIPS = {c.name: c for c in (
    Chip('v4', 'TPU v4', 32 * GiB, 275e12, 1228e9, 2400e9 / 8, 3, 2, 'megacore',
         tuple(2 ** k for k in range(2, 12))),
    Chip('v5e', 'TPU v5 lite', 16 * GiB, 197e12, 819e9, 1600e9 / 8, 2, 1, 'default',
         (1, 4, 8, 16, 32, 64, 128, 256)),
    Chip('v5p', 'TPU v5', 95 * GiB, 459e12, 2765e9, 4800e9 / 8, 3, 2, 'megacore',
         tuple(2 ** k for k in range(2, 13))),
    Chip('v6e', 'TPU v6 lite', 32 * GiB, 918e12, 1640e9, 3584e9 / 8, 2, 1, 'default',
         (1, 4, 8, 16, 32, 64, 128, 256)),
)}
ALIASES = {'v5litepod': 'v5e'}


@dataclasses.dataclass(frozen=True)
class Topology:
  chip: Chip
  grid: tuple[int, ...]  # chips along each torus axis
  num_slices: int = 1

  @property
  def chips(self) -> int:
    return math.prod(self.grid) * self.num_slices

  @property
  def name(self) -> str:
    cores = math.prod(self.grid) * self.chip.cores_per_chip
    slices = f' x {self.num_slices} slices' if self.num_slices > 1 else ''
    return f'{self.chip.name}-{cores} ({"x".join(map(str, self.grid))}){slices}'

  @property
  def libtpu_name(self) -> str:
    return f'{self.chip.name}:{"x".join(map(str, self.grid))}'

  @property
  def chips_per_host(self) -> tuple[int, int, int]:
    """A host's chips: 2x2 (2x2x1), except single-host v5e/v6e slices of one chip (1x1) and eight (2x4)."""
    if self.chip.torus_dims == 2 and math.prod(self.grid) in (1, 8):
      return (self.grid[0], self.grid[1], 1)
    return (2, 2, 1)


def grid_for(chip: Chip, chips: int) -> tuple[int, ...]:
  """Cloud TPU's shape of a slice of `chips` chips: 1x1, 2x2, 2x4, 4x4 ... (2-D) or 2x2x1, 2x2x2, 2x2x4,
  2x4x4, 4x4x4 ... (3-D); each size doubles the shortest axis, the last of equals."""
  grid = [1, 1] if chips == 1 else ([2, 2] if chip.torus_dims == 2 else [2, 2, 1])
  while math.prod(grid) < chips:
    i = max(i for i, g in enumerate(grid) if g == min(grid))
    grid[i] *= 2
  return tuple(grid)


def _chip(name: str, spec: str) -> Chip:
  chip = CHIPS.get(ALIASES.get(name, name))
  if chip is None:
    raise ConfigError(f'--topology {spec!r}: unknown TPU generation {name!r}; valid: '
                      f'{", ".join(list(CHIPS) + list(ALIASES))} (e.g. v5e-64, v4-32, v5p-128, v6e-8, v5e:4x8)')
  return chip


def parse(spec: str, num_slices: int = 1) -> Topology:
  """'v5e-64', 'v5litepod-16', 'v4-32', 'v5p-128', 'v6e-8', or a chip grid 'v5e:4x8' / 'v4:2x2x4'."""
  if not isinstance(num_slices, int) or num_slices < 1:
    raise ConfigError(f'--num_slices must be a positive integer; got {num_slices!r}')
  m = re.fullmatch(r'([a-z0-9]+)-(\d+)', spec.strip())
  if m:
    chip = _chip(m.group(1), spec)
    count = int(m.group(2))
    chips, rest = divmod(count, chip.cores_per_chip)
    if rest or chips not in chip.sizes:
      valid = ', '.join(f'{chip.name}-{n * chip.cores_per_chip}' for n in chip.sizes)
      raise ConfigError(f'--topology {spec!r}: no such slice; {chip.name} slices are {valid}'
                        + (' (v4/v5p names count TensorCores, two per chip)' if chip.cores_per_chip > 1 else ''))
    return Topology(chip, grid_for(chip, chips), num_slices)
  m = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)+)', spec.strip())
  if m:
    chip = _chip(m.group(1), spec)
    grid = tuple(int(g) for g in m.group(2).split('x'))
    if len(grid) != chip.torus_dims or min(grid) < 1:
      example = '4x8' if chip.torus_dims == 2 else '2x2x4'
      raise ConfigError(f'--topology {spec!r}: a {chip.name} chip grid has {chip.torus_dims} positive axes '
                        f'(e.g. {chip.name}:{example})')
    return Topology(chip, grid, num_slices)
  raise ConfigError(f'--topology {spec!r}: expected a slice name such as v5e-64, v4-32, v5p-128, v6e-8, or a '
                    'chip grid such as v5e:4x8, v4:2x2x4')


def prepare_libtpu() -> None:
  """Environment for libtpu on a host without TPUs, set before it loads (values already set are kept).

  Unanswered, libtpu asks the cloud metadata server what it runs on and prints two warnings: naming a
  one-host runtime answers it (the compile targets are given explicitly and do not depend on it). Its log
  goes to stderr from level WARNING, where XLA's SPMD partitioner reports involuntary rematerialisation
  (libtpu's default shows errors only), and to no log files (default: /tmp/tpu_logs, a set per process).
  Several processes may load it at once (by default the first holds /tmp/libtpu_lockfile, meant for a
  machine's TPU chips, and the others fail)."""
  for name, value in (('TPU_WORKER_HOSTNAMES', 'localhost'), ('TPU_HOST_BOUNDS', '1,1,1'),
                      ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1'),
                      ('TPU_STDERR_LOG_LEVEL', '1'), ('TPU_MIN_LOG_LEVEL', '1'), ('TPU_LOG_DIR', 'disabled')):
    os.environ.setdefault(name, value)


def devices(topology: Topology) -> list:
  """Compile-only devices of the topology (num_slices slices of its grid), in libtpu's order; slice
  `device.slice_index`. Needs libtpu (`pip install libtpu`, or posjax's `test` extra)."""
  prepare_libtpu()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    desc = topologies.get_topology_desc(
        platform='tpu', topology_name=topology.libtpu_name, chip_config_name=topology.chip.chip_config,
        chips_per_host_bounds=topology.chips_per_host, num_slices=topology.num_slices)
  except Exception as e:  # pylint: disable=broad-except  (libtpu's errors are JaxRuntimeError/RuntimeError)
    message = str(e).split('\n')[0]
    if 'libtpu' in message.lower() or 'tpu' not in message.lower():
      message += ' (is libtpu installed? pip install libtpu, or posjax[test])'
    raise ConfigError(f'--topology {topology.libtpu_name}: libtpu refused it: {message}') from None
  return list(desc.devices)
