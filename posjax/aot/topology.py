"""TPU slice names and GPU hosts -> compile-only devices, on any host (no accelerator needed).

    devices = topology.devices(topology.parse('v5e-64', num_slices=2))   # 128 TPU v5e devices, 64 per slice
    devices = topology.devices(topology.parse('h100-8'))                 # one host's 8 NVIDIA H100s

TPU slice names follow Cloud TPU: `v5e-N` / `v5litepod-N` and `v6e-N` count chips, `v4-N` and `v5p-N` count
TensorCores (two per chip, one device per chip as megacore). A topology can also be named by its chip grid,
`v5e:4x8` or `v4:2x2x4`. Chip figures are Google's published ones (Cloud TPU system architecture pages):
HBM per chip, peak bf16 FLOP/s, HBM bandwidth, and the ICI bandwidth of a chip over all its links. TPU
devices come from libtpu's topology descriptions.

GPUs: `h100-N` / `h200-N`, N = 1, 2, 4 or 8 SXM GPUs of one host joined by NVLink (several hosts are not
modelled: traffic between them would need the network's figures). Their devices come from XLA's deviceless
GPU compile, a target description of the GPU (`Chip.gpu_target`) handed to JAX's CUDA plugin, which must be
installed (`pip install 'jax[cuda12]'`, ~5 GB of CUDA wheels; not a posjax extra) while JAX itself runs on
the CPU. Figures are NVIDIA's published ones (dense bf16 peak, HBM bandwidth, NVLink 900 GB/s per GPU); HBM
is the size nvidia-smi reports. A process gets XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of it unless
that variable says otherwise, so "fits" on a GPU is against the whole of it.
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
  name: str  # what slice names start with: v4, v5e, v5p, v6e, h100, h200
  device_kind: str  # jax's Device.device_kind for it
  hbm_bytes: int
  peak_flops: float  # bf16 FLOP/s
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s per chip, all links together
  torus_dims: int  # 3: v4/v5p (AxBxC), 2: v5e/v6e (AxB)
  cores_per_chip: int  # TensorCores a slice name counts per chip
  chip_config: str  # libtpu's chip configuration: megacore gives one device per two-core chip
  sizes: tuple[int, ...]  # chip counts of the slice names Cloud TPU offers (GPUs: per host)
  platform: str = 'tpu'  # or 'gpu'
  gpu_cores: int = 0  # GPUs: streaming multiprocessors

  @property
  def gpu_target(self) -> str:
    """XLA's GPU target description (a GpuTargetConfigProto in text form) of a Hopper SXM GPU with this
    chip's HBM and bandwidth: what the GPU compiler reads in place of a device (limits as CUDA reports them
    for an H100 SXM)."""
    return (f'gpu_device_info {{ threads_per_block_limit: 1024 threads_per_warp: 32 '
            f'shared_memory_per_block: 49152 shared_memory_per_core: 233472 threads_per_core_limit: 2048 '
            f'core_count: {self.gpu_cores} fpus_per_core: 128 block_dim_limit_x: 2147483647 '
            f'block_dim_limit_y: 65535 block_dim_limit_z: 65535 memory_bandwidth: {int(self.hbm_bandwidth)} '
            f'l2_cache_size: 52428800 clock_rate_ghz: 1.98 device_memory_size: {self.hbm_bytes} '
            f'shared_memory_per_block_optin: 232448 cuda_compute_capability {{ major: 9 }} '
            f'registers_per_core_limit: 65536 registers_per_block_limit: 65536 }} platform_name: "CUDA" '
            f'dnn_version_info {{ major: 9 minor: 8 }} runtime_version {{ major: 12 minor: 9 }} '
            f'device_description_str: "{self.device_kind}"')


CHIPS = {c.name: c for c in (
    Chip('v4', 'TPU v4', 32 * GiB, 275e12, 1228e9, 2400e9 / 8, 3, 2, 'megacore',
         tuple(2 ** k for k in range(2, 12))),
    Chip('v5e', 'TPU v5 lite', 16 * GiB, 197e12, 819e9, 1600e9 / 8, 2, 1, 'default',
         (1, 4, 8, 16, 32, 64, 128, 256)),
    Chip('v5p', 'TPU v5', 95 * GiB, 459e12, 2765e9, 4800e9 / 8, 3, 2, 'megacore',
         tuple(2 ** k for k in range(2, 13))),
    Chip('v6e', 'TPU v6 lite', 32 * GiB, 918e12, 1640e9, 3584e9 / 8, 2, 1, 'default',
         (1, 4, 8, 16, 32, 64, 128, 256)),
    Chip('h100', 'NVIDIA H100 80GB HBM3', 81559 * 2**20, 989e12, 3350e9, 900e9, 1, 1, '', (1, 2, 4, 8),
         platform='gpu', gpu_cores=132),
    Chip('h200', 'NVIDIA H200', 143771 * 2**20, 989e12, 4800e9, 900e9, 1, 1, '', (1, 2, 4, 8),
         platform='gpu', gpu_cores=132),
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
    if self.chip.platform == 'gpu':
      return f'{self.chip.name}-{self.chips}'
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
  if chip.platform == 'gpu':
    return (chips,)
  grid = [1, 1] if chips == 1 else ([2, 2] if chip.torus_dims == 2 else [2, 2, 1])
  while math.prod(grid) < chips:
    i = max(i for i, g in enumerate(grid) if g == min(grid))
    grid[i] *= 2
  return tuple(grid)


def _chip(name: str, spec: str) -> Chip:
  chip = CHIPS.get(ALIASES.get(name, name))
  if chip is None:
    raise ConfigError(f'--topology {spec!r}: unknown chip {name!r}; valid: '
                      f'{", ".join(list(CHIPS) + list(ALIASES))} (e.g. v5e-64, v4-32, v5p-128, v6e-8, v5e:4x8, '
                      'h100-8)')
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
    if chip.platform == 'gpu':
      if count not in chip.sizes:
        raise ConfigError(f'--topology {spec!r}: {chip.name}-N counts the GPUs of one host, N in '
                          f'{", ".join(map(str, chip.sizes))}')
      if num_slices > 1:
        raise ConfigError(f'--topology {spec!r} --num_slices={num_slices}: several GPU hosts are not modelled '
                          '(one host of up to 8 GPUs over NVLink)')
    if rest or chips not in chip.sizes:
      valid = ', '.join(f'{chip.name}-{n * chip.cores_per_chip}' for n in chip.sizes)
      raise ConfigError(f'--topology {spec!r}: no such slice; {chip.name} slices are {valid}'
                        + (' (v4/v5p names count TensorCores, two per chip)' if chip.cores_per_chip > 1 else ''))
    return Topology(chip, grid_for(chip, chips), num_slices)
  m = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)*)', spec.strip())
  if m:
    chip = _chip(m.group(1), spec)
    grid = tuple(int(g) for g in m.group(2).split('x'))
    if chip.platform == 'gpu':
      raise ConfigError(f'--topology {spec!r}: GPUs are named by their count, e.g. {chip.name}-8')
    if len(grid) != chip.torus_dims or min(grid) < 1:
      example = '4x8' if chip.torus_dims == 2 else '2x2x4'
      raise ConfigError(f'--topology {spec!r}: a {chip.name} chip grid has {chip.torus_dims} positive axes '
                        f'(e.g. {chip.name}:{example})')
    return Topology(chip, grid, num_slices)
  raise ConfigError(f'--topology {spec!r}: expected a slice name such as v5e-64, v4-32, v5p-128, v6e-8, a '
                    'chip grid such as v5e:4x8, v4:2x2x4, or GPUs such as h100-8')


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
  `device.slice_index`. Needs libtpu (`pip install libtpu`, or posjax's `test` extra); GPUs need JAX's CUDA
  plugin."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if topology.chip.platform == 'gpu':
    try:
      desc = topologies.get_topology_desc(platform='cuda', target_config=topology.chip.gpu_target,
                                          topology=f'1x1x{topology.chips}')
    except Exception as e:  # pylint: disable=broad-except  (NotImplementedError without the plugin)
      raise ConfigError(f'--topology {topology.name}: JAX cannot describe this GPU here ({type(e).__name__}: '
                        f'{str(e).splitlines()[0]}); it needs JAX\'s CUDA plugin, pip install '
                        f'\'jax[cuda12]=={jax.__version__}\', with JAX on the CPU (JAX_PLATFORMS=cpu)') from None
    return list(desc.devices)
  prepare_libtpu()
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
