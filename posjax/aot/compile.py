"""Compile the trainer's own jitted train step for a set of devices, without data, and read what the compiler
says about it: memory per chip, FLOPs and bytes, collectives, its warnings.

    compiled = compile.compile_train_step(config, topology.devices(topo))
    report = compile.report(compiled, topo.chip, topo.name)   # a JSON-able dict

Everything the step is built from comes from the task and the trainer: the objective and optimizer from the
task's own builder (`pretraining.abstract_batches` / `finetuning.abstract_batches`, the functions its
`make_task` uses), the state and batch shardings and the jit from `trainer.sharded_steps`, the pretraining
batch's fields from the input pipeline (`posjax.data.pipeline.batch_spec`); this module only supplies abstract
arguments in place of data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from posjax.aot import flops as flops_lib
from posjax.aot import hlo
from posjax.aot.topology import Chip
from posjax.errors import ConfigError
from posjax.training import checkpoint, sharding, trainer

GiB = 2 ** 30


class DoesNotFit(ConfigError):
  """The TPU compiler found the step needs more memory than a chip has. `below`: when a search for the
  largest batch stopped early, the smallest batch found not to fit (a smaller one was not tried)."""

  def __init__(self, message: str, below: int | None = None):
    super().__init__(message)
    self.below = below


def batch_divisor(config, mesh) -> int:
  """Global batch sizes must be multiples of this: grad_accum_steps x the mesh axes the batch is split over."""
  n, _ = sharding.axis_size(mesh, dict(sharding.rules(config)).get('batch'))
  return config.grad_accum_steps * n


@dataclasses.dataclass
class Compiled:
  """A compiled train step and what it was made from."""
  config: Any
  mesh: Any
  setup: trainer.ShardedSteps
  objective: Any
  lowered: Any
  compiled: Any
  lower_s: float
  compile_s: float
  log: list[str]  # the compiler's stderr during lowering and compilation
  predictions: int
  state: Any  # the abstract train state (ShapeDtypeStructs with their shardings)


def _out_of_memory(message: str) -> str | None:
  if 'RESOURCE_EXHAUSTED' not in message and 'Ran out of memory' not in message:
    return None
  return message.split('RESOURCE_EXHAUSTED:', 1)[-1].strip().split('\n')[0].rstrip('.')


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard of each)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


def compile_train_step(config, devices) -> Compiled:
  """Lowers and compiles the trainer's train step for `devices` (compile-only TPU devices, or the local
  ones) with `config.mesh` over them. Raises ConfigError for a bad config or mesh, DoesNotFit when the
  compiler runs out of memory."""
  from posjax.training import pretraining  # pylint: disable=g-import-not-at-top
  from posjax.finetune import finetuning  # pylint: disable=g-import-not-at-top
  trainer.validate(config)
  objective, tx, lr, fields = (finetuning if 'task' in config else pretraining).abstract_batches(config)
  predictions = fields['positions'][0][1] if 'positions' in fields else 0
  mesh = sharding.make_mesh(config.mesh, devices)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config)):
    setup = trainer.sharded_steps(config, objective, tx, lr, mesh)
    state = checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=setup.batch_sharding)
             for k, (shape, dtype) in fields.items()}
    with hlo.captured_stderr() as log:
      t0 = time.perf_counter()
      lowered = setup.train_step.lower(state, batch)
      t1 = time.perf_counter()
      try:
        compiled = lowered.compile()
      except Exception as e:  # pylint: disable=broad-except  (jax raises JaxRuntimeError; keep others as they are)
        oom = _out_of_memory(str(e))
        if oom is None:
          raise
        mesh_text = ' '.join(f'{k}={v}' for k, v in zip(mesh.axis_names, mesh.devices.shape))
        raise DoesNotFit(
            f'batch {config.batch_size} x {config.data.seq_len} does not fit (mesh {mesh_text}): the compiler '
            f'says: {oom}; per chip the train state takes {per_device_bytes(state) / GiB:.2f} GiB and the batch '
            f'{per_device_bytes(batch) / GiB:.3f} GiB (--find_max_batch searches the largest batch; '
            'grad_accum_steps, model.remat_policy and mesh.fsdp save memory)') from None
      t2 = time.perf_counter()
  return Compiled(config, mesh, setup, objective, lowered, compiled, t1 - t0, t2 - t1, log, predictions, state)


def _probe(config, devices, chip: Chip | None, batch_size: int) -> tuple[int | None, Compiled | None]:
  """(per-chip total bytes, the compiled step) at `batch_size`; (None, None) when it does not fit."""
  c = config.copy_and_resolve_references()
  c.batch_size = batch_size
  try:
    compiled = compile_train_step(c, devices)
  except DoesNotFit:
    return None, None
  total = report_memory(compiled.compiled)['total']
  return (total, compiled) if chip is None or total <= chip.hbm_bytes else (None, None)


def find_max_batch(config, devices, chip: Chip | None, max_compiles: int = 16, known=None, log=None):
  """(the compiled step at the largest global batch that fits, batch sizes tried), searching multiples k of
  the batch divisor: memory is nearly linear in k, so the next k is the line through the two largest that fit
  (through the one fit and the origin while there is one) extrapolated to the chip's HBM, clamped into the
  bracket of known fits and misses, and the bracket is halved instead whenever the previous extrapolation
  missed. Ends when the bracket closes or after `max_compiles` (then the largest fit found). `known`: {batch
  size: its Compiled, its per-chip total bytes (a report's figure), or None where it did not fit} from
  compiles already made; a largest fit known only by its bytes is compiled once more at the end, to be
  returned."""
  mesh = sharding.make_mesh(config.mesh, devices)
  d = batch_divisor(config, mesh)
  hbm = chip.hbm_bytes if chip is not None else None
  lo, hi, fits, tried, best, misses = 0, None, {}, [], None, []
  for b, made in (known or {}).items():
    total = made if made is None or isinstance(made, int) else report_memory(made.compiled)['total']
    if total is None or (hbm is not None and total > hbm):
      hi = min(hi or b // d, b // d)
      misses.append(b)
    else:
      fits[b // d] = total
      if b // d > lo:
        lo, best = b // d, made
  k, extrapolated = (max(1, config.batch_size // d) if not known else None), False
  for _ in range(max_compiles + 1):
    if k is not None:
      total, compiled = _probe(config, devices, chip, k * d)
      tried.append(k * d)
      if log:
        log(f'batch {k * d}: ' + (f'{total / GiB:.2f} GiB per chip, fits' if total is not None else 'does not fit'))
      missed = extrapolated and total is None
      if total is not None:
        fits[k] = total
        if k > lo:
          lo, best = k, compiled
      else:
        hi = k if hi is None else min(hi, k)
    else:
      missed = False
    if (hi is not None and hi - lo <= 1) or len(tried) >= max_compiles:
      break
    guess, extrapolated = None, False
    top = sorted(fits)[-2:]
    if top and hbm is not None and not missed:
      # One fit: the line through it and zero bytes at batch 0 is steeper than memory's own (the state's bytes
      # do not grow with the batch), so it undershoots, and the second point lands near the HBM, where the
      # two-point line then has little left to extrapolate.
      k0, k1 = (top[0] if len(top) == 2 else 0), top[-1]
      slope = (fits[k1] - fits.get(k0, 0)) / (k1 - k0)
      if slope > 0:
        guess, extrapolated = k1 + int((hbm - fits[k1]) // slope), True
    if guess is None:  # double up (no HBM size), quarter down (from a miss with no fit known), else halve
      guess = 2 * lo if hi is None else (hi // 4 if not lo else (lo + hi) // 2)
    k = max(guess, lo + 1) if hi is None else min(max(guess, lo + 1), hi - 1)
  if isinstance(best, int):
    best = _probe(config, devices, chip, lo * d)[1]
    if best is None:  # the figure came from another version of the code or the compiler
      raise DoesNotFit(f'batch {lo * d}, known to fit from an earlier compile, does not fit when compiled again',
                       below=lo * d)
  if not lo:
    smallest = min(tried + misses or [d])
    if smallest <= d:
      raise DoesNotFit(f'no batch fits: not even {d} (batch sizes are multiples of grad_accum_steps x the mesh '
                       f'axes the batch is split over, {d})')
    raise DoesNotFit(f'no batch tried fits, down to {smallest}: the search stopped after {len(tried)} compiles '
                     f'(max_compiles) before reaching {d}, the smallest batch; a batch under {smallest} may fit',
                     below=smallest)
  return best, tried


def report_memory(compiled) -> dict[str, int]:
  """Per chip: argument, output, alias, temp and generated-code bytes, and their total (aliased outputs
  share their arguments' buffers: counted once)."""
  mem = compiled.memory_analysis()
  m = {k: int(getattr(mem, f'{k}_size_in_bytes', 0) or 0)
       for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  m['total'] = m['argument'] + m['output'] - m['alias'] + m['temp'] + m['generated_code']
  return m


def state_bytes(c: Compiled) -> int:
  """Bytes of the whole train state (parameters, optimizer moments, counters), unsharded."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(c.state))


def parameter_count(c: Compiled) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(c.state.params))


def _ratio(a: float, b: float) -> float:
  return a / b if b else 1.0


def cost_analysis(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled program ('flops', 'bytes accessed', ...), one dict whatever the jax
  version returns; empty where the backend gives none (XLA's GPU compiler deviceless)."""
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return {k: float(v) for k, v in (ca or {}).items()}


def report(c: Compiled, chip: Chip | None = None, topology_name: str = '') -> dict:
  """The compiled step per chip as a JSON-able dict (see the README's AOT section for every field).

  `chip`: the TPU the devices are (HBM size, peak FLOP/s and bandwidths for the fit and the roofline);
  None for other devices (CPU), which leaves those fields out."""
  config, mesh = c.config, c.mesh
  n = mesh.devices.size
  m = report_memory(c.compiled)
  text = c.compiled.as_text() or ''
  cost, counted = cost_analysis(c.compiled), hlo.costs(text)
  # XLA's cost analysis (of one device's partitioned program) counts a while loop's body once: scaled by
  # what the loops add to the matmul FLOPs and instruction bytes counted in the HLO text.
  hlo_flops = cost.get('flops', 0.0) * _ratio(counted['matmul_flops'], counted['matmul_flops_once'])
  bytes_accessed = cost.get('bytes accessed', 0.0) * _ratio(counted['bytes'], counted['bytes_once'])
  costs_from = 'compiler'
  if not cost:  # XLA's GPU compiler gives no cost analysis: the HLO text's own counts
    hlo_flops, bytes_accessed, costs_from = counted['matmul_flops'], counted['bytes'], 'hlo text'
  model = flops_lib.train_step(c.objective.model, config.batch_size, config.data.seq_len, c.predictions)
  mcfg = c.objective.model.config
  slices = len({getattr(d, 'slice_index', 0) or 0 for d in mesh.devices.flat})
  found = hlo.collectives(text, slices)
  collectives = hlo.summarise(found)
  warnings = hlo.warnings(c.log)
  out = {
      'model': {'type': config.get('model_type', 'classifier'),
                'objective': config.get('objective', f'classification ({config.get("task")})'),
                'attention': mcfg.attention, 'layers': mcfg.num_layers, 'hidden': mcfg.hidden_size,
                'heads': mcfg.num_heads, 'parameters': parameter_count(c), 'dtype': jax.numpy.dtype(mcfg.dtype).name,
                'scan_layers': bool(mcfg.scan_layers), 'remat_policy': mcfg.remat_policy},
      'batch': {'size': config.batch_size, 'seq_len': config.data.seq_len, 'predictions': c.predictions,
                'grad_accum_steps': config.grad_accum_steps, 'divisor': batch_divisor(config, mesh)},
      'devices': {'topology': topology_name, 'count': n, 'kind': mesh.devices.flat[0].device_kind,
                  'slices': slices},
      'mesh': dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
      'state_bytes': state_bytes(c),
      'memory_per_chip': m,
      'hlo_flops_per_chip': hlo_flops,
      'hlo_matmul_flops_per_chip': counted['matmul_flops'],
      'hlo_bytes_accessed_per_chip': bytes_accessed,
      'cost_analysis': {k: cost[k] for k in ('flops', 'bytes accessed') if k in cost},
      # 'hlo text': FLOPs of dot/convolution instructions only, none of a custom call's (a Triton kernel's)
      'costs_from': costs_from,
      'model_flops': model,
      'model_flops_per_chip': model / n,
      'hlo_matmul_over_model_flops': counted['matmul_flops'] * n / model if model else None,
      'collectives': collectives,
      'lower_s': c.lower_s,
      'compile_s': c.compile_s,
      'warnings': warnings,
  }
  if chip is not None:
    out['memory_per_chip'].update(hbm=chip.hbm_bytes, fits=m['total'] <= chip.hbm_bytes,
                                  margin=chip.hbm_bytes - m['total'])
    compute = hlo_flops / chip.peak_flops
    memory = bytes_accessed / chip.hbm_bandwidth
    ici = sum(s['ici_traffic'] for s in collectives.values()) / chip.ici_bandwidth
    step = max(compute, memory, ici)
    out['roofline'] = {'compute_s': compute, 'memory_s': memory, 'ici_s': ici, 'step_s': step,
                       'bound': ('compute', 'memory', 'ici')[int(np.argmax([compute, memory, ici]))],
                       'mfu': (model / n) / (step * chip.peak_flops) if step else None,
                       'peak_flops': chip.peak_flops, 'hbm_bandwidth': chip.hbm_bandwidth,
                       'ici_bandwidth': chip.ici_bandwidth,
                       'dcn_traffic_per_chip': sum(s['dcn_traffic'] for s in collectives.values())}
  return out


def dump(c: Compiled, directory: str, rep: dict) -> list[str]:
  """Writes the lowered StableHLO, the optimised HLO and the report to `directory`; returns the paths."""
  os.makedirs(directory, exist_ok=True)
  paths = []
  for name, text in (('train_step.stablehlo.mlir', c.lowered.as_text()),
                     ('train_step.optimized.hlo.txt', c.compiled.as_text() or ''),
                     ('report.json', json.dumps(rep, indent=1, default=str))):
    path = os.path.join(directory, name)
    with open(path, 'w') as f:
      f.write(text)
    paths.append(path)
  return paths
