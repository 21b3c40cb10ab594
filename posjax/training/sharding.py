"""The device mesh and the logical-to-mesh axis table: the only place sharding is decided."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from posjax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    raise ConfigError(f'mesh: sizes must be positive with at most one -1 ("the rest"); got '
                      f'{dict(zip(MESH_AXES, sizes))}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'mesh: {num_devices} devices cannot be split with fixed axes '
                        f'{dict(zip(MESH_AXES, sizes))}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                      f'but {num_devices} are present')
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """`config.mesh` over `devices` (default: all of JAX's), in an order that suits the interconnect.

  Devices of several TPU slices (multi-slice: slices joined by the data-centre network, DCN) get the data
  axis across slices: each slice holds `data / slices` of its rows and whole fsdp and tensor axes, so only
  the data-parallel gradient reduction crosses DCN."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  # Linen's logical partitioning works with Auto axes; make_mesh's default is Explicit.
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  slices = len({getattr(d, 'slice_index', 0) or 0 for d in devices})
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  if slices == 1:
    try:
      return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except ValueError:  # no mapping of whole torus axes to mesh axes (e.g. a 3-D torus): split them
      return Mesh(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True), MESH_AXES,
                  axis_types=axis_types)
  if shape[0] % slices:
    raise ConfigError(f'mesh: the data axis ({shape[0]}) must be a multiple of the number of slices ({slices}): '
                      'slices are joined by the data-centre network, which only the data-parallel reduction '
                      f'crosses; mesh {dict(zip(MESH_AXES, shape))}')
  grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices,) + shape[1:], (slices, 1, 1), devices)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def rules(config) -> tuple[tuple[str, object], ...]:
  """`config.logical_axis_rules` as flax wants them; a rule naming no mesh axis fails here."""
  out = tuple((name, tuple(axis) if isinstance(axis, list) else axis)
              for name, axis in config.logical_axis_rules)
  for name, axis in out:
    for a in (axis if isinstance(axis, tuple) else (axis,)):
      if a is not None and a not in MESH_AXES:
        raise ConfigError(f'logical_axis_rules: {name!r} -> {a!r} names an unknown mesh axis; mesh axes: '
                          f'{", ".join(MESH_AXES)} (or None: replicated)')
  return out


def axis_size(mesh: Mesh, axis) -> tuple[int, str]:
  axes = [a for a in (axis if isinstance(axis, tuple) else (axis,)) if a is not None]
  return math.prod(mesh.shape[a] for a in axes), ' x '.join(f'{a}={mesh.shape[a]}' for a in axes)


def check_batch(batch_size: int, grad_accum_steps: int, mesh: Mesh, rule_table) -> None:
  """Each micro-batch must split evenly over the mesh axes the `batch` rule names."""
  n, named = axis_size(mesh, dict(rule_table).get('batch'))
  if batch_size % (grad_accum_steps * n):
    raise ConfigError(f'batch_size ({batch_size}) must be divisible by grad_accum_steps ({grad_accum_steps}) '
                      f'x the mesh axes the batch is split over ({named or "none"}: {n}) = '
                      f'{grad_accum_steps * n}')


def check_params(abstract_params, mesh: Mesh, rule_table) -> None:
  """Every sharded parameter dimension must divide evenly over its mesh axes (jax refuses uneven shards):
  one error naming the parameter, its logical axis and both sizes, before anything compiles."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_leaves_with_path(abstract_params,
                                               is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for path, leaf in leaves:
    if not isinstance(leaf, nn.LogicallyPartitioned):
      continue
    mesh_axes = nn.logical_to_mesh_axes(leaf.names, rule_table)
    for size, name, axis in zip(leaf.value.shape, leaf.names, mesh_axes):
      n, named = axis_size(mesh, axis)
      if size % n:
        where = '/'.join(str(getattr(k, 'key', k)) for k in path)
        hint = ''
        if name == 'heads':
          hint = (' (the ELECTRA generator has max(1, round(num_heads x electra.generator_fraction)) heads)'
                  if 'generator' in where else ' (model.num_heads)')
        raise ConfigError(f'parameter {where}: its {name!r} axis has {size}{hint}, which the mesh axes '
                          f'logical_axis_rules map it to ({named}: {n}) do not divide; change config.mesh or '
                          f'map {name!r} to other axes')


def batch_sharding(mesh: Mesh, config) -> NamedSharding:
  axis = dict(rules(config)).get('batch')
  return NamedSharding(mesh, P(axis))


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Host arrays (this process's share of the batch) -> global arrays laid out on the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def process_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's contiguous share of a global host batch (all of it with one process)."""
  n, i = jax.process_count(), jax.process_index()
  rows = len(next(iter(batch.values())))
  if rows % n:
    raise ConfigError(f'batch_size ({rows}) must be divisible by the number of processes ({n})')
  return {k: v[i * rows // n:(i + 1) * rows // n] for k, v in batch.items()}
