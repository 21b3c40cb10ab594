"""posjax train-step benchmarks against peers measured in the same process.

    python bench/run.py --quick                       # mini BERT, length 128, every variant, peers
    python bench/run.py --sizes=base --lengths=128,512 --dtype=bfloat16   # e.g. on a GPU

For each (size, length) it times one optimizer step (forward, backward, AdamW update) of posjax BERT with
every attention variant, of ConvBERT and ALBERT of the same size, and of the peers on identical shapes and
optimizer: transformers' `FlaxBertForMaskedLM` (same framework) and PyTorch `BertForMaskedLM` (eager and
`torch.compile`). It reports step time, tokens/s, compile time, XLA's FLOPs per step and MFU against a
matmul peak measured in the same run, and XLA's static peak-memory estimate. Ratios are always against a
peer measured in this run, never against numbers from elsewhere. Results: `OUT/results.json` and
`OUT/results.md`.

Every measurement is timed alternately with posjax BERT (absolute) of the same shape, step by step, after a
warm-up step of each: the median of `--steps` steps each ended by `block_until_ready`. Load on a shared machine
then slows both alike, and the ratios (the targets of issue 8) stay meaningful.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from posjax.aot import compile as aot_compile  # noqa: E402
from posjax.attention import registry  # noqa: E402

# Every registered component alone, and Chang et al.'s composite attention.
VARIANTS = tuple(registry.names()) + ('none+convfixed+convq+convk',)
# Issue 8's budgets, as ratios of the absolute baseline's step time: content-free score terms (their offset
# tables) and the query/key-dependent ones.
BIAS_ONLY = tuple(n for n in registry.names() if registry.get(n).offsets is not None)
QK_DEPENDENT = tuple(n for n in registry.names()
                     if registry.get(n).role == 'score' and registry.get(n).offsets is None)
VOCAB = 30522
LR = 1e-4


@dataclasses.dataclass
class Result:
  name: str
  size: str
  seq_len: int
  batch: int
  step_s: float | None = None
  compile_s: float | None = None
  flops: float | None = None
  peak_bytes: float | None = None
  base_step_s: float | None = None  # posjax BERT absolute's step, timed alternately with this one
  error: str | None = None

  @property
  def tokens_per_s(self):
    return self.batch * self.seq_len / self.step_s if self.step_s else None


def load_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(f'bench_cfg_{name}', os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def fake_batch(batch: int, seq_len: int, max_predictions: int, seed: int = 0):
  """MLM inputs with no padding: every model sees the same numbers of tokens and masked positions."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, VOCAB, (batch, seq_len), dtype=np.int32)
  positions = np.sort(np.stack([rng.choice(np.arange(1, seq_len), max_predictions, replace=False)
                                for _ in range(batch)]), axis=1).astype(np.int32)
  labels = np.take_along_axis(ids, positions, 1)
  return {'ids': ids, 'mask': np.ones_like(ids), 'type_ids': np.zeros_like(ids), 'positions': positions,
          'labels': labels, 'weights': np.ones(positions.shape, np.float32)}


def bench_posjax(name, config_file, arg, seq_len, batch, dtype, objective='mlm', model_overrides=None):
  """One posjax train step (steps.train_step, the trainer's own) on one device."""
  import flax.linen as nn
  from posjax.config import ModelConfig
  from posjax.training import objectives, optimizer, steps as steps_lib
  res = Result(name, '', seq_len, batch)
  config = load_config(config_file, arg)
  config.objective = objective
  config.data.seq_len = seq_len
  config.learning_rate = LR
  config.num_train_steps = 1000
  d = {**config.model.to_dict(), 'vocab_size': VOCAB, 'dtype': dtype,
       'max_position_embeddings': max(seq_len, config.model.max_position_embeddings),
       'hidden_dropout': 0.0, 'attention_dropout': 0.0, **(model_overrides or {})}
  mcfg = ModelConfig.from_dict(d)
  p = math.ceil(seq_len * config.data.mask_prob)
  objective_ = objectives.make(config, mcfg, seq_len, p)
  tx = optimizer.make(config)
  state = jax.jit(lambda: nn.unbox(steps_lib.init_state(tx, 0, steps_lib.init_params(objective_, 0))))()
  fn = jax.jit(lambda s, b: steps_lib.train_step(s, b, objective=objective_, tx=tx,
                                                 lr_schedule=optimizer.schedule(config)), donate_argnums=0)
  return _compiled(res, fn, state, fake_batch(batch, seq_len, p))


def _compiled(res: Result, fn, state, batch):
  """Compiles jitted `fn(state, batch)`, recording compile time, FLOPs and peak memory in `res`; returns
  (res, step callable)."""
  batch = jax.device_put(batch)
  t = time.perf_counter()
  compiled = fn.lower(state, batch).compile()
  res.compile_s = time.perf_counter() - t
  res.flops, res.peak_bytes = _costs(compiled)
  return res, _jax_stepper(compiled, state, batch)


def _costs(compiled):
  flops = peak = None
  try:
    flops = aot_compile.cost_analysis(compiled).get('flops', 0.0) or None
  except Exception:  # pylint: disable=broad-except  (backends without cost analysis)
    pass
  try:
    ma = compiled.memory_analysis()
    peak = float(ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
                 - ma.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass
  return flops, peak


def _jax_stepper(compiled, state, batch):
  """A no-argument callable running one blocking step; the (donated) state lives in the closure."""
  box = [state]

  def step():
    box[0], _ = jax.block_until_ready(compiled(box[0], batch))
  return step


def paired(base_step, step, n: int):
  """(median seconds of `step`, median of `base_step`), the two timed alternately after a warm-up of each:
  load on a shared machine then hits both alike, so their ratio stays meaningful."""
  base_step()
  step()
  ours, theirs = [], []
  for _ in range(n):
    for fn, out in ((base_step, theirs), (step, ours)):
      t = time.perf_counter()
      fn()
      out.append(time.perf_counter() - t)
  return statistics.median(ours), statistics.median(theirs)


def hf_bert_config(size_arg, seq_len, **kw):
  """transformers' BertConfig of posjax BERT `size_arg` (configs/bert.py), dropout off like posjax's here."""
  import transformers
  m = load_config('bert', size_arg).model
  return transformers.BertConfig(vocab_size=VOCAB, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                                 num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
                                 max_position_embeddings=max(seq_len, 512), hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, **kw)


def bench_flax_hf(size_arg, seq_len, batch):
  """transformers' FlaxBertForMaskedLM with the same shapes, AdamW and masked-position loss."""
  import transformers
  res = Result('hf-flax FlaxBertForMaskedLM', size_arg, seq_len, batch)
  hfc = hf_bert_config(size_arg, seq_len)
  model = transformers.FlaxBertForMaskedLM(hfc, seed=0, _do_init=True)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, weight_decay=0.01))
  state = (model.params, tx.init(model.params))
  p = math.ceil(seq_len * 0.15)

  def step(state, b):
    params, opt = state

    def loss_fn(params):
      logits = model(b['ids'], attention_mask=b['mask'], token_type_ids=b['type_ids'], params=params,
                     train=False).logits
      picked = jnp.take_along_axis(logits, b['positions'][..., None], 1)
      return optax.softmax_cross_entropy_with_integer_labels(picked, b['labels']).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(g, opt, params)
    return (optax.apply_updates(params, updates), opt), loss

  fn = jax.jit(step, donate_argnums=0)
  return _compiled(res, fn, state, fake_batch(batch, seq_len, p))


def bench_torch(size_arg, seq_len, batch, compile_: bool):
  """PyTorch BertForMaskedLM (CPU torch, float32), eager or torch.compile, AdamW, loss on masked positions."""
  import torch
  import transformers
  name = 'torch BertForMaskedLM ' + ('compile' if compile_ else 'eager')
  res = Result(name, size_arg, seq_len, batch)
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  hfc = hf_bert_config(size_arg, seq_len, attn_implementation='sdpa')
  model = transformers.BertForMaskedLM(hfc).train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
  b = fake_batch(batch, seq_len, math.ceil(seq_len * 0.15))
  labels = np.full(b['ids'].shape, -100, np.int64)
  np.put_along_axis(labels, b['positions'], b['labels'], 1)
  ids, mask, types = (torch.tensor(b[k]).long() for k in ('ids', 'mask', 'type_ids'))
  labels = torch.tensor(labels)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss

  fn = torch.compile(step) if compile_ else step
  t = time.perf_counter()
  fn()  # compiles under torch.compile
  res.compile_s = time.perf_counter() - t
  return res, fn


def matmul_peak(dtype: str, n: int | None = None) -> float:
  """FLOP/s of a large square matmul on the default device, timed here: the MFU denominator."""
  on_cpu = jax.default_backend() == 'cpu'
  n = n or (2048 if on_cpu else 8192)
  dt = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
  a = jax.random.normal(jax.random.key(0), (n, n), dt)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  times = []
  for _ in range(5):
    t = time.perf_counter()
    jax.block_until_ready(f(a))
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(times)


def guarded(label, size, seq_len, base, steps, fn, *args):
  """Prepares with `fn` and times against `base` (a step callable; None: this is the base, timed alone).
  A failing measurement becomes a row with its error, not a lost run. Returns (Result, step or None)."""
  step = None
  try:
    r, step = fn(*args)
    r.step_s, r.base_step_s = paired(base or step, step, steps)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    r = Result(label, size, seq_len, 0, error=f'{type(e).__name__}: {e}'.splitlines()[0][:200])
  r.name, r.size = label, size
  print(f'  {r.name:<34} L{r.seq_len:<4} step {r.step_s or float("nan"):8.4f}s  compile '
        f'{r.compile_s or float("nan"):6.1f}s' + (f'  ERROR {r.error}' if r.error else ''), flush=True)
  return r, step


def machine() -> str:
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  return f'{dev.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores ({cpu}); jax {jax.__version__}'


def run(args) -> dict:
  peak = matmul_peak(args.dtype)
  print(f'matmul peak: {peak / 1e9:.1f} GFLOP/s ({args.dtype})', flush=True)
  rows = []
  for size in args.sizes:
    for seq_len in args.lengths:
      base = None

      def add(label, fn, *rest, _size=size, _len=seq_len):
        r, step = guarded(label, _size, _len, base, args.steps, fn, *rest)
        rows.append(r)
        return step
      base = add('posjax bert absolute', bench_posjax, 'posjax bert absolute', 'bert', f'{size},absolute',
                 seq_len, args.batch, args.dtype)
      if base is None:
        continue
      for v in args.variants:
        if v != 'absolute':
          add(f'posjax bert {v}', bench_posjax, f'posjax bert {v}', 'bert', f'{size},{v}', seq_len, args.batch,
              args.dtype)
      if args.models:
        # ConvBERT and ALBERT with this BERT's layers, width, heads and feed-forward (their papers' base
        # models share BERT-base's); their own mechanisms come from their configs.
        m = load_config('bert', size).model
        dims = dict(num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=m.num_heads,
                    intermediate_size=m.intermediate_size)
        add('posjax convbert', bench_posjax, 'posjax convbert', 'convbert', 'base', seq_len, args.batch,
            args.dtype, 'mlm', dict(dims, embedding_size=0, ffn_groups=1))
        add('posjax albert', bench_posjax, 'posjax albert', 'albert', 'base', seq_len, args.batch,
            args.dtype, 'mlm', dict(dims, embedding_size=min(128, m.hidden_size)))
      if args.peers:
        add('hf-flax FlaxBertForMaskedLM', bench_flax_hf, size, seq_len, args.batch)
        add('torch BertForMaskedLM eager', bench_torch, size, seq_len, args.batch, False)
        if args.torch_compile:
          add('torch BertForMaskedLM compile', bench_torch, size, seq_len, args.batch, True)
  return {'machine': machine(), 'dtype': args.dtype, 'batch': args.batch, 'steps': args.steps,
          'matmul_peak_flops': peak, 'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
          'rows': [dict(dataclasses.asdict(r), tokens_per_s=r.tokens_per_s) for r in rows]}


def ratios(report: dict) -> list[dict]:
  """Each row's step time over posjax BERT absolute's, timed alternately with it (same size and length); for
  a peer that is how many times faster posjax is. Memory: XLA's estimate over the baseline's."""
  out = []
  for r in report['rows']:
    if not r['step_s'] or r['name'] == 'posjax bert absolute':
      continue
    base = next((b for b in report['rows'] if b['name'] == 'posjax bert absolute' and b['size'] == r['size']
                 and b['seq_len'] == r['seq_len']), None)
    peer = not r['name'].startswith('posjax')
    out.append({'size': r['size'], 'seq_len': r['seq_len'], 'name': r['name'],
                'ratio': r['step_s'] / r['base_step_s'],
                'kind': 'peer step / posjax absolute step' if peer else 'step / posjax absolute step',
                'memory_ratio': (r['peak_bytes'] / base['peak_bytes']
                                 if base and r['peak_bytes'] and base['peak_bytes'] else None)})
  return out


def markdown(report: dict) -> str:
  peak = report['matmul_peak_flops']
  lines = [f'Machine: {report["machine"]}; {report["dtype"]}, batch {report["batch"]}, median of '
           f'{report["steps"]} steps; matmul peak {peak / 1e9:.1f} GFLOP/s; {report["date"]}.'
           + (f' {report["host_malloc"]}.' if report.get('host_malloc') else ''), '',
           '| model | size | L | step (ms) | tokens/s | compile (s) | GFLOP/step | MFU | peak mem (MB) | vs posjax absolute |',
           '|---|---|---|---|---|---|---|---|---|---|']
  ratio = {(x['name'], x['size'], x['seq_len']): x for x in ratios(report)}
  for r in report['rows']:
    if r['error']:
      lines.append(f'| {r["name"]} | {r["size"]} | {r["seq_len"]} | failed: {r["error"]} | | | | | | |')
      continue
    mfu = r['flops'] / r['step_s'] / peak if r['flops'] else None
    x = ratio.get((r['name'], r['size'], r['seq_len']))
    rel = ''
    if x:
      rel = (f'posjax {x["ratio"]:.2f}x faster' if not r['name'].startswith('posjax')
             else f'{x["ratio"]:.2f}x time' + (f', {x["memory_ratio"]:.2f}x mem' if x['memory_ratio'] else ''))
    lines.append(
        f'| {r["name"]} | {r["size"]} | {r["seq_len"]} | {1e3 * r["step_s"]:.1f} | {r["tokens_per_s"]:.0f} | '
        f'{r["compile_s"]:.1f} | ' + (f'{r["flops"] / 1e9:.1f}' if r['flops'] else 'n/a') + ' | '
        + (f'{100 * mfu:.1f}%' if mfu else 'n/a') + ' | '
        + (f'{r["peak_bytes"] / 2**20:.0f}' if r['peak_bytes'] else 'n/a') + f' | {rel} |')
  return '\n'.join(lines) + '\n'


def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--quick', action='store_true', help='mini, L128, batch 8, 3 steps, no torch.compile')
  ap.add_argument('--sizes', default='mini', help='comma-separated BERT sizes (configs/bert.py SIZES)')
  ap.add_argument('--lengths', default='128,512')
  ap.add_argument('--variants', default=','.join(VARIANTS))
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--steps', type=int, default=5)
  ap.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  ap.add_argument('--no-peers', dest='peers', action='store_false')
  ap.add_argument('--no-models', dest='models', action='store_false', help='skip ConvBERT and ALBERT')
  ap.add_argument('--no-torch-compile', dest='torch_compile', action='store_false')
  ap.add_argument('--out', default=os.path.join(REPO, 'bench', 'results'))
  args = ap.parse_args(argv)
  if args.quick:
    args.sizes, args.lengths, args.batch, args.steps, args.torch_compile = 'mini', '128', 8, 3, False
  args.sizes = args.sizes.split(',')
  args.lengths = [int(x) for x in str(args.lengths).split(',')]
  args.variants = args.variants.split(',')
  from posjax.attention import registry
  for v in args.variants:
    registry.parse(v)  # an unknown variant stops here, listing the valid ones
  for size in args.sizes:
    load_config('bert', size)  # an unknown size stops here, listing the valid ones
  return args


def main(argv=None) -> int:
  from posjax.errors import ConfigError
  try:
    args = parse(argv)
  except ConfigError as e:  # an unknown size or variant: one line naming the valid ones
    print(f'error: {e}', file=sys.stderr)
    return 2
  # Before the first computation: the same allocator for posjax and the peers (posjax.training.host_memory).
  from posjax.training import host_memory
  malloc = host_memory.keep_freed_memory()
  print(malloc, flush=True)
  report = {**run(args), 'host_malloc': malloc}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump({**report, 'ratios': ratios(report)}, f, indent=1)
  table = markdown(report)
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(table)
  print(table)
  return 0


if __name__ == '__main__':
  sys.exit(main())
