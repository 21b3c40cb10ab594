"""TPU tables from ahead-of-time compiles of the real train step on this host (posjax.aot; libtpu, no TPU).

    python bench/aot_tables.py models      # BERT-base/-large, ALBERT-xxlarge, ELECTRA-large, ConvBERT-base
    python bench/aot_tables.py variants    # memory of each attention variant against absolute, base size

`models`: each model at L128 and L512 on v5e-8, v4-32 and v5p-64 with the recommended mesh (FSDP over every
chip: parameters and AdamW state split, batch split over all chips), bfloat16, scanned layers, batch 256:
memory per chip and whether it fits, then the largest global batch that fits (`compile.find_max_batch`,
at most --max_compiles compiles; a bracket left open is marked >=), the estimated MFU and the compile time there.
`variants`: BERT-base on v5e-4 (data parallel, 4 chips), L512 batch 32 and L2048 batch 8: temporaries and
total memory per chip, and their ratio to `absolute`.

Rows are kept in bench/results/aot_{models,variants}.json as they finish (a row already there is not
searched again, only compiled once at its largest batch where it lacks a figure the table shows or its MFU
is of an older cost count; delete the file to start over; `models --reopen` searches further, from the
figures kept, the rows whose largest batch is still a lower bound) and the tables written to
bench/results/aot_*.md. The JSON files are tracked: the README's tables are printed from them, and a later
checkout resumes from them. Compiles of these sizes took 20-80 s each on 2 idle CPU cores (2026-12-05).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'bench', 'results')
GiB = 2 ** 30

MODELS = [('BERT-base', 'bert', 'base'), ('BERT-large', 'bert', 'large'), ('ALBERT-xxlarge', 'albert', 'xxlarge'),
          ('ELECTRA-large', 'electra', 'large'), ('ConvBERT-base', 'convbert', 'base')]
TOPOLOGIES = ('v5e-8', 'v4-32', 'v5p-64')
# Version of posjax.aot's FLOP and byte count behind the MFU column (2: in-place slices count their slice;
# 3: the TPU compiler's windowed matmul loops count every iteration). Rows of an older count show "?" until
# the script, run again over their topology, recompiles them at their largest batch.
COSTS = 3
# HLO matmul FLOPs over the model formula's above which the compiler rematerialised to fit (scanned layers
# under FSDP match the formula to 2%; see README).
REMAT = 1.05
VARIANTS = ('absolute', 'tisa', 'relative_key_query', 'none+convfixed+convq+convk', 'absolute+convbert')


def config(module: str, arg: str, seq_len: int, batch: int, mesh=(1, -1, 1)):
  spec = importlib.util.spec_from_file_location(f'configs_{module}', os.path.join(ROOT, 'configs', f'{module}.py'))
  m = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(m)
  c = m.get_config(arg)
  c.model.dtype = 'bfloat16'
  c.model.scan_layers = True
  c.data.seq_len = seq_len
  c.model.max_position_embeddings = max(c.model.max_position_embeddings, seq_len)
  c.batch_size = batch
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c


def _load(path):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {}


def _save(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(rows, f, indent=1)


def models(args):
  from posjax.aot import compile as compile_lib, topology  # pylint: disable=g-import-not-at-top
  path = os.path.join(RESULTS, 'aot_models.json')
  rows = _load(path)
  for spec in args.topologies:
    topo = topology.parse(spec)
    devices = topology.devices(topo)
    for label, module, arg in MODELS:
      for seq_len in args.lengths:
        key = f'{label} L{seq_len} {spec}'
        c = config(module, arg, seq_len, args.batch)
        if key in rows:
          row = rows[key]
          if args.reopen and not row.get('largest_exact'):
            search(row, c, devices, topo, known_from(row), args.max_compiles)
          # MFU from an older cost count, or a figure missing at the largest batch: compile it there again.
          if row['largest'] and (row.get('costs') != COSTS or not {'largest_compile_s', 'largest_matmuls'} <= set(row)):
            best = c.copy_and_resolve_references()
            best.batch_size = row['largest']
            r = compile_lib.report(compile_lib.compile_train_step(best, devices), topo.chip, topo.name)
            row.update(largest_mfu=r['roofline']['mfu'], largest_compile_s=r['compile_s'],
                       largest_matmuls=r['hlo_matmul_over_model_flops'])
          row.pop('mfu', None)
          row['costs'] = COSTS
          _save(path, rows)
          continue
        row = {'model': label, 'L': seq_len, 'topology': spec, 'mesh': 'fsdp', 'batch': args.batch, 'costs': COSTS}
        t = time.perf_counter()
        try:
          compiled = compile_lib.compile_train_step(c, devices)
          r = compile_lib.report(compiled, topo.chip, topo.name)
          m = r['memory_per_chip']
          row.update(fits=m['fits'], memory_gib=m['total'] / GiB, mfu=r['roofline']['mfu'],
                     compile_s=r['compile_s'], parameters=r['model']['parameters'], warnings=len(r['warnings']))
          known = {args.batch: compiled}
        except compile_lib.DoesNotFit:
          row.update(fits=False, compile_s=time.perf_counter() - t)
          known = {args.batch: None}
        print(key, row, flush=True)
        search(row, c, devices, topo, known, args.max_compiles)
        rows[key] = row
        _save(path, rows)
  # The README's table, as it stands there.
  table = ['| model | L | topology | mesh | batch 256 | largest batch that fits | est. MFU there | compile there |',
           '|---|---|---|---|---|---|---|---|']
  for row in rows.values():
    fits = f'fits, {row["memory_gib"]:.2f} GiB/chip' if row.get('fits') else 'does not fit'
    if row.get('below'):
      largest = f'< {row["below"]} (none tried fits)'
    else:
      largest = ('' if row.get('largest_exact') else '>= ') + str(row['largest'])
      if row.get('largest_memory_gib'):
        largest += f' ({row["largest_memory_gib"]:.1f} GiB/chip)'
    mfu = '-' if not row.get('largest_mfu') else (
        f'{100 * row["largest_mfu"]:.0f}%' if row.get('costs') == COSTS else '?')
    if row.get('largest_matmuls', 1) > REMAT:
      mfu += f', remat {row["largest_matmuls"]:.2f}x'
    compile_s = f'{row["largest_compile_s"]:.0f} s' if row.get('largest_compile_s') else '-'
    chips = topology.parse(row['topology']).chips
    table.append(f'| {row["model"]} | {row["L"]} | {row["topology"]} | FSDP over {chips} chips | {fits} | '
                 f'{largest} | {mfu} | {compile_s} |')
  return '\n'.join(table)


def search(row, c, devices, topo, known, max_compiles):
  """The largest batch that fits into `row`, searched from the compiles in `known` ({batch: Compiled, bytes
  per chip, or None where it did not fit})."""
  from posjax.aot import compile as compile_lib  # pylint: disable=g-import-not-at-top
  try:
    best, tried = compile_lib.find_max_batch(c, devices, topo.chip, max_compiles=max_compiles, known=known,
                                             log=lambda s: print('  ', s, flush=True))
  except compile_lib.DoesNotFit as e:  # no batch fits, or none tried before the compile budget ran out
    row.update(largest=0, below=e.below, tried=row.get('tried', []), largest_exact=e.below is None,
               largest_mfu=None)
    return
  largest = best.config.batch_size
  r = compile_lib.report(best, topo.chip, topo.name)
  tried = sorted(set(row.get('tried', [])) | set(tried))
  # Exact when the next multiple of the divisor was found not to fit.
  exact = largest + r['batch']['divisor'] in set(tried) | set(known)
  row.update(largest=largest, tried=tried, largest_exact=exact, largest_mfu=r['roofline']['mfu'],
             largest_memory_gib=r['memory_per_chip']['total'] / GiB, largest_compile_s=r['compile_s'],
             largest_matmuls=r['hlo_matmul_over_model_flops'], below=None)


def known_from(row) -> dict:
  """The search's known compiles from a kept row: its batch-256 compile, its largest fit and, above that, the
  batches it tried (which did not fit)."""
  known = {row['batch']: int(row['memory_gib'] * GiB) if row.get('fits') else None}
  if row.get('largest'):
    known[row['largest']] = int(row['largest_memory_gib'] * GiB)
  known.update({b: None for b in row.get('tried', []) if b > row.get('largest', 0)})
  if row.get('below'):
    known[row['below']] = None
  return known


def variants(args):
  from posjax.aot import compile as compile_lib, topology  # pylint: disable=g-import-not-at-top
  path = os.path.join(RESULTS, 'aot_variants.json')
  rows = _load(path)
  topo = topology.parse('v5e-4')
  devices = topology.devices(topo)
  for seq_len, batch in ((512, 32), (2048, 8)):
    for variant in args.variants:
      key = f'{variant} L{seq_len}'
      if key in rows:
        continue
      c = config('bert', f'base,{variant}', seq_len, batch, mesh=(4, 1, 1))
      try:
        compiled = compile_lib.compile_train_step(c, devices)
      except compile_lib.DoesNotFit as e:  # past the chip's usable HBM the compiler stops: no figures
        rows[key] = {'variant': variant, 'L': seq_len, 'batch': batch, 'fits': False, 'error': str(e)}
      else:
        m = compile_lib.report_memory(compiled.compiled)
        rows[key] = {'variant': variant, 'L': seq_len, 'batch': batch, 'temp_gib': m['temp'] / GiB,
                     'total_gib': m['total'] / GiB, 'compile_s': compiled.compile_s}
      print(key, rows[key], flush=True)
      _save(path, rows)
  # The README's table, as it stands there.
  table = ['| variant | L512 temporaries | ratio to absolute | L512 total | L2048 temporaries | ratio | L2048 total |',
           '|---|---|---|---|---|---|---|']
  for variant in args.variants:
    cells = []
    for seq_len in (512, 2048):
      row, base = rows.get(f'{variant} L{seq_len}'), rows.get(f'absolute L{seq_len}')
      if row is None:
        cells += ['not measured', '', '']
      elif 'temp_gib' not in row:
        cells += ['does not fit a v5e chip', '', '']
      else:
        ratio = f'{row["temp_gib"] / base["temp_gib"]:.2f}' if base and 'temp_gib' in base else '-'
        cells += [f'{row["temp_gib"]:.2f} GiB', ratio, f'{row["total_gib"]:.2f} GiB']
    table.append(f'| {variant} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(table)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('table', choices=('models', 'variants'))
  ap.add_argument('--lengths', default='128,512', type=lambda s: [int(x) for x in s.split(',')])
  ap.add_argument('--topologies', default=','.join(TOPOLOGIES), type=lambda s: s.split(','))
  ap.add_argument('--variants', default=','.join(VARIANTS), type=lambda s: s.split(','))
  ap.add_argument('--batch', default=256, type=int)
  ap.add_argument('--max_compiles', default=4, type=int, help='per largest-batch search')
  ap.add_argument('--reopen', action='store_true',
                  help='models: search again, from the figures kept, rows whose largest batch is a lower bound')
  args = ap.parse_args(argv)
  sys.path.insert(0, ROOT)
  text = models(args) if args.table == 'models' else variants(args)
  with open(os.path.join(RESULTS, f'aot_{args.table}.md'), 'w') as f:
    f.write(text + '\n')
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
