"""GPU time and memory of attention with position terms: posjax's fused Triton kernel against the XLA path
and cuDNN's fused attention, both given the terms as a dense bias.

    python bench/gpu_attention.py                       # BERT-base heads (12 x 64), bf16, L 512 and 2048
    python bench/gpu_attention.py --lengths=512 --batch=8 --out=/tmp/gpu

Per length, one attention call's forward and backward pass (the gradients of q, k, v and of the offset table)
for B x L x 12 x 64 inputs with TISA-like per-head terms (one table over offsets j - i) and a padded batch:
- `kernel`: posjax.attention.flash with the GPU kernel (posjax/attention/flash_gpu.py), from the table;
- `xla`:    the table spread into a dense B x H x L x L bias (posjax's XLA path), jax.nn.dot_product_attention
            with implementation='xla';
- `cudnn`:  the same dense bias, implementation='cudnn' (cuDNN's flash attention; the bias in bf16).
Time: the median of --repeats timed calls of the jitted forward+backward, alternating implementations call by
call so a clock change hits them alike; memory: the compiled program's temporary bytes (XLA's memory
analysis). Ratios are against `kernel` in the same run. A GPU is needed (`--smoke` runs tiny shapes on any
backend, the kernel in interpret mode off a GPU, to check the script itself).

Without a GPU, `--compile_for=h100|h200` compiles the same three programs for that GPU on this host (XLA's
deviceless GPU compile from posjax.aot.topology's target description; Triton turns the kernel into PTX,
ptxas into machine code) and reports the compiler's temporary bytes; no time. It needs JAX's CUDA plugin,
`pip install 'jax[cuda12]==JAX_VERSION'` (~5 GB of CUDA wheels, not one of posjax's extras).

Results: OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
if __name__ == '__main__' and any(a.startswith('--compile_for') for a in sys.argv):
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # a compile: JAX on the CPU (no GPU driver looked for)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from posjax.aot import topology  # noqa: E402
from posjax.attention import flash, offsets  # noqa: E402
from posjax.errors import ConfigError  # noqa: E402

IMPLS = ('kernel', 'xla', 'cudnn')
GPUS = sorted(name for name, chip in topology.CHIPS.items() if chip.platform == 'gpu')


def inputs(batch, length, heads, dh, dtype):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(batch, length, heads, dh)), dtype) for _ in range(3))
  table = jnp.asarray(rng.normal(size=(heads, 2 * length - 1)), jnp.float32)
  mask = np.ones((batch, length), bool)
  mask[::2, length * 3 // 4:] = False  # every other row padded by a quarter
  return q, k, v, table, jnp.asarray(mask)


def loss_fn(impl: str, interpret: bool):
  def attend(q, k, v, table, mask):
    scale = q.shape[-1] ** -0.5
    if impl == 'kernel':
      return flash.attention(q, k, v, table, mask, scale=scale, kernel='triton', interpret=interpret)
    bias = offsets.spread(table, q.shape[1]).astype(q.dtype)
    bias = jnp.broadcast_to(bias, (q.shape[0],) + bias.shape[1:])
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask[:, None, None, :], scale=scale,
                                        implementation=impl)

  def loss(q, k, v, table, mask):
    return jnp.sum(attend(q, k, v, table, mask).astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3)))


def measure(lengths, batch, heads, dh, dtype, repeats, impls, interpret, device=None):
  """With `device` (one for ahead-of-time compiles) the programs are compiled for it, not run: memory only."""
  rows = []
  for length in lengths:
    args = inputs(batch, length, heads, dh, dtype)
    if device is not None:
      one = jax.sharding.SingleDeviceSharding(device)
      args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one) for a in args]
    fns, row = {}, {'L': length, 'batch': batch, 'heads': heads, 'head_dim': dh, 'dtype': jnp.dtype(dtype).name}
    for impl in impls:
      fn = loss_fn(impl, interpret)
      try:
        compiled = fn.lower(*args).compile()
        if device is None:
          jax.block_until_ready(compiled(*args))  # warm-up
      except Exception as e:  # pylint: disable=broad-except  (a missing cuDNN or an OOM is a result here)
        row[impl] = {'error': f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'}
        continue
      mem = compiled.memory_analysis()
      row[impl] = {'temp_bytes': getattr(mem, 'temp_size_in_bytes', None), 'times': []}
      if device is None:
        fns[impl] = compiled
    for _ in range(repeats):
      for impl, fn in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        row[impl]['times'].append(time.perf_counter() - t)
    for impl in impls:
      times = row[impl].pop('times', [])
      if times:
        row[impl]['ms'] = 1e3 * statistics.median(times)
    base = row.get('kernel', {})
    for impl in impls:
      r = row[impl]
      if 'ms' in r and 'ms' in base:
        r['time_vs_kernel'] = r['ms'] / base['ms']
      if r.get('temp_bytes') and base.get('temp_bytes'):
        r['memory_vs_kernel'] = r['temp_bytes'] / base['temp_bytes']
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def markdown(report) -> str:
  how = ('compiled on a CPU host, not run: no times' if report.get('compiled_only')
         else f'median of {report["repeats"]}')
  lines = [f'{report["device"]}, {report["dtype"]}, batch {report["batch"]}, {report["heads"]} heads of '
           f'{report["head_dim"]}; forward + backward of one attention call, {how}',
           '', '| L | implementation | ms | x kernel | temporaries MiB | x kernel |', '|---|---|---|---|---|---|']
  for row in report['rows']:
    for impl in report['impls']:
      r = row[impl]
      if 'error' in r:
        lines.append(f'| {row["L"]} | {impl} | {r["error"]} | | | |')
        continue
      mib = f'{r["temp_bytes"] / 2**20:.1f}' if r.get('temp_bytes') is not None else '-'
      t_ratio, m_ratio = (f'{r[k]:.2f}' if k in r else '-' for k in ('time_vs_kernel', 'memory_vs_kernel'))
      ms = f'{r["ms"]:.2f}' if 'ms' in r else '-'
      lines.append(f'| {row["L"]} | {impl} | {ms} | {t_ratio} | {mib} | {m_ratio} |')
  return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--lengths', default='512,2048', type=lambda s: [int(x) for x in s.split(',')])
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--repeats', type=int, default=20)
  ap.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  ap.add_argument('--out', default=os.path.join(REPO, 'bench', 'results', 'gpu_attention'))
  ap.add_argument('--smoke', action='store_true', help='tiny shapes on any backend (checks the script)')
  ap.add_argument('--compile_for', choices=GPUS, help='compile for this GPU on this host: memory only')
  args = ap.parse_args(argv)
  backend = jax.default_backend()
  heads, dh, impls = 12, 64, IMPLS
  device = None
  if args.compile_for:
    try:
      device = topology.devices(topology.parse(f'{args.compile_for}-1'))[0]
    except ConfigError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
  elif args.smoke:
    args.lengths, args.batch, args.repeats, heads, dh = [40], 2, 2, 2, 16
    impls = IMPLS if backend == 'gpu' else ('kernel', 'xla')
  elif backend != 'gpu':
    print(f'error: bench/gpu_attention.py measures on a GPU; JAX\'s backend here is {backend!r} '
          '(--smoke checks the script on any backend; --compile_for=h100|h200 compiles for one: memory only)',
          file=sys.stderr)
    return 2
  rows = measure(args.lengths, args.batch, heads, dh, jnp.dtype(args.dtype), args.repeats, impls,
                 interpret=backend != 'gpu' and device is None, device=device)
  report = {'device': (device or jax.devices()[0]).device_kind, 'dtype': args.dtype, 'batch': args.batch,
            'heads': heads, 'head_dim': dh, 'repeats': args.repeats, 'impls': list(impls),
            'compiled_only': device is not None, 'jax': jax.__version__, 'date': time.strftime('%Y-%m-%d'),
            'rows': rows}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(report, f, indent=1)
  text = markdown(report)
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(text)
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
