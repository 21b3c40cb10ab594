"""Memory of position terms in the fused kernel against the XLA path, by the TPU or GPU compiler on this host.

    JAX_PLATFORMS=cpu python bench/attention_memory.py                   # BERT-base on v5e:2x2, L 512/2048/8192
    JAX_PLATFORMS=cpu python bench/attention_memory.py --lengths=512 --variants=tisa --out=/tmp/tpu
    JAX_PLATFORMS=cpu python bench/attention_memory.py --topology=h200-1 --lengths=512,2048 --batch=8

No TPU or GPU is needed: `--topology` is any of posjax.aot's (a TPU slice, compiled by libtpu, default
v5e:2x2; or GPUs such as h200-1, compiled by XLA's GPU compiler through JAX's CUDA plugin, which must be
installed). For each length and variant it compiles posjax's real BERT-base MLM train step (forward, backward,
AdamW) with `model.attention_impl` = 'xla' (a dense [B|1]xHxLxL bias handed to jax.nn.dot_product_attention)
and 'pallas' (posjax.attention.flash: the terms per tile from O(H L) tables; the Mosaic kernel on a TPU, the
Triton one on a GPU), data-parallel over the topology's chips with `--batch` rows per chip, layers scanned,
bfloat16 compute, attention dropout off (the kernel does not drop probabilities). It reports per chip the
compiler's temporary bytes, the whole footprint (arguments + outputs - aliased + temporaries) against the
chip's HBM, and a roofline time (FLOPs over the chip's bf16 peak, bytes over its HBM bandwidth). On a TPU the
costs are the compiled cost analyses (the kernels' are the estimates posjax.attention.flash hands to
pallas_call); XLA's cost analysis counts a while loop's body once, so the scanned step's FLOPs and bytes get
(layers - 1) x those of one encoder layer's forward and backward pass, compiled alone under the same mesh.
The GPU compiler gives no cost analysis: its costs are posjax.aot.hlo's count of the HLO text (loops counted
as often as they run; matmul FLOPs only, none inside the Triton kernel, so its roofline is a lower bound). A
step that does not fit a TPU fails to compile; the compiler's message says by how much, and the table shows
that.

It also compiles the scoring function of posjax.analysis.extrapolation (MLM loss on one row) at
`--extrapolate` x 512 tokens on one chip, to show which variants can be scored at 16x a 512 training length.

Results: OUT/results.json and OUT/results.md; the default OUT, bench/results/attention_memory, is tracked and
holds the README's table: a run keeps the rows there and compiles only the missing ones (delete a row to
measure it again).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from posjax.aot import compile as aot_compile, hlo, topology  # noqa: E402
from posjax.data import pretrain  # noqa: E402
from posjax.analysis import extrapolation  # noqa: E402
from posjax.errors import ConfigError  # noqa: E402
from posjax.models import Bert  # noqa: E402
from posjax.models.bert import Layer  # noqa: E402
from posjax.training import objectives, optimizer, pretraining, sharding, trainer  # noqa: E402

GiB = 2**30


@dataclasses.dataclass
class Row:
  what: str  # 'train' or 'score'
  variant: str
  impl: str
  length: int
  batch: int  # rows per chip
  fits: bool | None = None
  temp_bytes: float | None = None
  total_bytes: float | None = None
  flops: float | None = None
  bytes_accessed: float | None = None
  roofline_s: float | None = None
  compile_s: float | None = None
  costs_from: str = 'compiler'  # or 'hlo text' (the GPU compiler gives no cost analysis)
  note: str = ''


def bert_config(size: str, variant: str, impl: str, length: int, batch: int):
  spec = importlib.util.spec_from_file_location('configs_bert', os.path.join(REPO, 'configs', 'bert.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(f'{size},{variant}')
  c.model.update(dtype='bfloat16', scan_layers=True, attention_dropout=0.0, attention_impl=impl,
                 max_position_embeddings=max(512, length))
  c.data.seq_len, c.batch_size = length, batch
  return c


def mlm_batch(length: int, rows: int, vocab: int):
  ids = np.random.default_rng(0).integers(5, vocab, size=(rows, length)).astype(np.int32)
  return pretrain.mask_tokens(ids, np.random.default_rng(1), pretrain.Specials(0, 2, 3, 4, 1), vocab)


def abstract(boxed, shardings):
  """ShapeDtypeStructs with shardings from an eval_shape tree with logical-axis boxes (unboxed without the
  sharding constraint nn.unbox would apply)."""
  tree = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


_UNITS = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
# The TPU compiler's out-of-memory messages: what it needed for the temporaries, or for everything.
_OOM = (('temp', r'HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM'),
        ('total', r'Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm'))


def needed_bytes(message: str) -> tuple[str, float] | None:
  """('temp' or 'total', bytes) the compiler said it needed, from an out-of-memory message."""
  for what, pattern in _OOM:
    m = re.search(pattern, message)
    if m:
      return what, float(m.group(1)) * _UNITS[m.group(2)]
  return None


def measure(row: Row, lower, chip: topology.Chip) -> Row:
  t0 = time.time()
  try:
    compiled = lower().compile()
  except Exception as e:  # pylint: disable=broad-except  (an out-of-memory compile is a result)
    msg = str(e)
    need = needed_bytes(msg)
    if need is None:
      traceback.print_exc()
      return dataclasses.replace(row, note=f'compile failed: {msg.splitlines()[0][:200]}')
    what, n = need
    return dataclasses.replace(row, fits=False, compile_s=time.time() - t0, **{f'{what}_bytes': n},
                               note=f'does not fit: the compiler needs {n / GiB:.1f} GiB for the {what}')
  ma = compiled.memory_analysis()
  cost = aot_compile.cost_analysis(compiled)
  total = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
           + ma.temp_size_in_bytes)
  flops, accessed, costs_from = float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0)), 'compiler'
  if not cost:
    counted = hlo.costs(compiled.as_text())
    flops, accessed, costs_from = counted['matmul_flops'], counted['bytes'], 'hlo text'
  return dataclasses.replace(
      row, fits=total <= chip.hbm_bytes, temp_bytes=float(ma.temp_size_in_bytes), total_bytes=float(total),
      flops=flops, bytes_accessed=accessed, roofline_s=max(flops / chip.peak_flops, accessed / chip.hbm_bandwidth),
      compile_s=time.time() - t0, costs_from=costs_from)


def layer_cost(mcfg, data, mesh, batch_sharding) -> tuple[float, float]:
  """(FLOPs, bytes accessed) of one encoder layer's forward and backward pass, per chip."""
  layer = Layer(mcfg)
  x = jax.ShapeDtypeStruct((*data['ids'].shape, mcfg.hidden_size), mcfg.dtype, sharding=batch_sharding)
  mask = jax.ShapeDtypeStruct(data['ids'].shape, jnp.bool_, sharding=batch_sharding)
  boxed = jax.eval_shape(lambda x, m: layer.init(jax.random.PRNGKey(0), x, m, True), x, mask)['params']
  params = abstract(boxed, nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh))

  def loss(p, x, mask):
    y = layer.apply({'params': p}, x, mask, False, rngs={'dropout': jax.random.PRNGKey(0)})
    return jnp.sum(y.astype(jnp.float32))
  cost = aot_compile.cost_analysis(jax.jit(jax.grad(loss, (0, 1))).lower(params, x, mask).compile())
  return float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))


def train_row(size, variant, impl, length, batch, mesh, chip) -> Row:
  c = bert_config(size, variant, impl, length, batch * mesh.size)
  c.mesh.data = mesh.shape['data']
  mcfg = pretraining.model_config(c, 30522)
  data = mlm_batch(length, batch * mesh.size, 30522)
  objective = objectives.make(c, mcfg, length, data['positions'].shape[1])
  rules = sharding.rules(c)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    setup = trainer.sharded_steps(c, objective, optimizer.make(c), optimizer.schedule(c), mesh)
    state = abstract(setup.abstract_state, setup.state_shardings)
    batch_abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding)
                      for k, v in data.items()}
    row = measure(Row('train', variant, impl, length, batch),
                  lambda: setup.train_step.lower(state, batch_abstract), chip)
    if row.flops is None or row.costs_from != 'compiler':  # the HLO text's count has every layer
      return row
    flops, accessed = layer_cost(mcfg, data, mesh, setup.batch_sharding)
  flops, accessed = row.flops + (mcfg.num_layers - 1) * flops, row.bytes_accessed + (mcfg.num_layers - 1) * accessed
  return dataclasses.replace(row, flops=flops, bytes_accessed=accessed,
                             roofline_s=max(flops / chip.peak_flops, accessed / chip.hbm_bandwidth))


def score_row(size, variant, impl, length, chip_device, chip) -> Row:
  """posjax.analysis.extrapolation's scoring of one row of `length` tokens on one chip."""
  c = bert_config(size, variant, impl, length, 1)
  mcfg = dataclasses.replace(pretraining.model_config(c, 30522), hidden_dropout=0.0)
  mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=[chip_device])
  data = mlm_batch(length, 1, 30522)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(c)):
    boxed = jax.eval_shape(lambda: Bert(mcfg).init(jax.random.PRNGKey(0), data['ids'][:, :8]))['params']
    params = abstract(boxed, jax.tree.map(lambda _: NamedSharding(mesh, P()), nn.get_partition_spec(boxed)))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, P())) for k, v in data.items()}
    score = jax.jit(functools.partial(extrapolation.mlm_scores, mcfg))
    return measure(Row('score', variant, impl, length, 1), lambda: score.lower(params, batch), chip)


def gib(x):
  return '-' if x is None else f'{x / GiB:.2f}'


def markdown(rows: list[Row], topo: topology.Topology, size: str) -> str:
  base = {(r.what, r.length, r.impl): r for r in rows if r.variant == 'absolute'}
  costs = ('the compiled cost analysis' if all(r.costs_from == 'compiler' for r in rows) else
           'the HLO text\'s matmuls and bytes (no cost analysis from this compiler; kernels\' FLOPs not counted)')
  out = [f'BERT-{size} MLM train step on {topo.name} (per chip; bfloat16 compute, scanned layers, attention '
         f'dropout off). temp: the compiler\'s temporaries; total: arguments + outputs - aliased + temp, '
         f'against {topo.chip.hbm_bytes / GiB:.1f} GiB HBM; x abs: temp / absolute\'s with the same implementation; '
         f'roofline: max(FLOPs / peak, bytes / bandwidth) from {costs}.', '',
         '| L | rows/chip | variant | XLA temp GiB | x abs | XLA total GiB | XLA roofline ms | kernel temp GiB '
         '| x abs | kernel total GiB | kernel roofline ms | kernel / XLA temp |', '|' + '---|' * 12]
  for length in sorted({r.length for r in rows if r.what == 'train'}):
    for variant in dict.fromkeys(r.variant for r in rows if r.what == 'train' and r.length == length):
      by = {r.impl: r for r in rows if (r.what, r.variant, r.length) == ('train', variant, length)}
      x, k = by.get('xla'), by.get('pallas')

      def cell(r, impl):
        if r is None:
          return ['-'] * 4
        if r.fits is None:  # a compile that failed for another reason than HBM (the row's note says which)
          return ['compile failed', '-', '-', '-']
        if r.fits is False:
          if r.temp_bytes is not None:
            return [f'{gib(r.temp_bytes)} (does not fit)', '-', 'over HBM', '-']
          return ['-', '-', f'{gib(r.total_bytes)} (does not fit)', '-']
        ab = base.get(('train', length, impl))
        ratio = f'{r.temp_bytes / ab.temp_bytes:.2f}' if ab and ab.temp_bytes else '-'
        return [gib(r.temp_bytes), ratio, gib(r.total_bytes),
                '-' if r.roofline_s is None else f'{1e3 * r.roofline_s:.1f}']
      ratio = (f'{k.temp_bytes / x.temp_bytes:.3f}' if x and k and x.temp_bytes and k.temp_bytes else '-')
      out.append('| ' + ' | '.join([str(length), str((x or k).batch), variant, *cell(x, 'xla'),
                                   *cell(k, 'pallas'), ratio]) + ' |')
  scores = [r for r in rows if r.what == 'score']
  if scores:
    out += ['', f'Extrapolation scoring (posjax.analysis.extrapolation.mlm_scores, one row) on one chip:', '',
            '| L | variant | XLA: fits? total GiB | kernel: fits? total GiB |', '|---|---|---|---|']
    for length in sorted({r.length for r in scores}):
      for variant in dict.fromkeys(r.variant for r in scores if r.length == length):
        by = {r.impl: r for r in scores if (r.variant, r.length) == (variant, length)}
        cells = []
        for i in ('xla', 'pallas'):
          r = by.get(i)
          if r is None or r.fits is None:
            cells.append('-')
          elif r.fits:
            cells.append(f'yes, {gib(r.total_bytes)}')
          else:
            cells.append(f'no: temporaries {gib(r.temp_bytes)}' if r.temp_bytes else f'no: {gib(r.total_bytes)}')
        out.append(f'| {length} | {variant} | {cells[0]} | {cells[1]} |')
  return '\n'.join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--topology', default='v5e:2x2')
  ap.add_argument('--size', default='base')
  ap.add_argument('--lengths', default='512,2048,8192')
  ap.add_argument('--variants', default='absolute,tisa,t5,alibi,convfixed,none+convfixed+convq+convk,'
                                        'relative_key_query')
  ap.add_argument('--impls', default='xla,pallas')
  ap.add_argument('--batch', type=int, default=1, help='rows per chip')
  ap.add_argument('--extrapolate', type=int, default=16, help='score at this multiple of 512 (0: skip)')
  ap.add_argument('--out', default=os.path.join(REPO, 'bench', 'results', 'attention_memory'),
                  help="rows kept here are not compiled again; the default holds the README's table")
  a = ap.parse_args(argv)
  try:
    topo = topology.parse(a.topology)
    devices = topology.devices(topo)
  except ConfigError as e:
    raise SystemExit(f'error: {e}') from None
  chip = topo.chip
  mesh = jax.make_mesh((len(devices), 1, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, 'results.json')
  rows = [Row(**r) for r in json.load(open(path))] if os.path.exists(path) else []
  done = {(r.what, r.variant, r.impl, r.length) for r in rows}

  def save(row):
    rows.append(row)
    print(json.dumps(dataclasses.asdict(row)), flush=True)
    with open(path, 'w') as f:
      json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    with open(os.path.join(a.out, 'results.md'), 'w') as f:
      f.write(markdown(rows, topo, a.size) + '\n')

  impls = a.impls.split(',')
  for length in (int(x) for x in a.lengths.split(',')):
    for variant in a.variants.split(','):
      for impl in impls:
        if ('train', variant, impl, length) not in done:
          save(train_row(a.size, variant, impl, length, a.batch, mesh, chip))
  if a.extrapolate:
    length = a.extrapolate * 512
    for variant in (v for v in a.variants.split(',') if v != 'absolute'):
      for impl in impls:
        if ('score', variant, impl, length) not in done:
          save(score_row(a.size, variant, impl, length, devices[0], chip))
  print(markdown(rows, topo, a.size))
  return 0


if __name__ == '__main__':
  sys.exit(main())
