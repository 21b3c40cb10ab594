"""Compare attention variants: pretrain each with identical data, vocabulary and seed, then tabulate.

    python -m posjax.compare --variants absolute,tisa,convfixed --size tiny --steps 600 --out runs/cmp
    python -m posjax.compare --quick --out runs/quick          # 3 variants, tiny, < 10 min on 2 CPU cores

Every variant is trained by the ordinary trainer (`posjax.training.pretraining.train_and_evaluate`) from the
config `bert:SIZE,VARIANT` gives (posjax/configs/bert.py), in OUT/<variant>/. The first run trains the WordPiece vocabulary; the others
reuse its tokenizer.json, and batches are a function of (seed, step), so all variants see the same token
stream (the offline default corpus is read once and kept in OUT/default_corpus.jsonl.gz). Written to OUT:
results.md and results.csv (parameters, final training loss, held-out MLM loss and accuracy, translation
invariance of the layer-0 positional attention, wall time) and loss_curves.png (from each workdir's
metrics.jsonl). Rerunning resumes or reuses finished runs, as the trainer does.

Optional columns: `--extrapolate 2,4` adds the held-out MLM loss at those multiples of the training length
(`posjax.analysis.extrapolation`; absolute embeddings show `-` past their table), and `--glue TASK
--glue_dir DIR` fine-tunes each pretrained variant on a GLUE task (or IMDB) with that task's preset and adds
its dev score (`--glue_set FIELD=VALUE` overrides the fine-tuning config, e.g. num_train_steps=300).
`register_evaluation(name, fn)` adds more: fn(workdir, config) -> dict of numbers, called after each run.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import re
import sys
import time
from typing import Callable

import numpy as np

from posjax import configs
from posjax.configs import bert as bert_config
from posjax.errors import ConfigError
from posjax.training import host_memory

# posjax/configs/bert.py's sizes, plus `micro` (1 layer, width 32, feed-forward 64) for tests and notebooks.
SIZES = ('micro',) + tuple(bert_config.SIZES)
QUICK = dict(variants='absolute,tisa,convfixed', size='tiny', steps=200, overrides={
    'data.seq_len': 64, 'batch_size': 32, 'data.vocab_size': 4096, 'warmup_steps': 20, 'eval_batches': 4})
MICRO = {'data.vocab_size': 1000, 'data.seq_len': 32, 'batch_size': 16, 'model.hidden_dropout': 0.0,
         'model.attention_dropout': 0.0, 'learning_rate': 3e-3, 'eval_batches': 2}

_EVALUATIONS: dict[str, Callable] = {}


def register_evaluation(name: str, fn: Callable) -> None:
  """Adds columns to the table: fn(workdir, config) -> {column: number}, run after each variant trains."""
  _EVALUATIONS[name] = fn


def extrapolation_evaluation(multiples: list[float], max_tokens: int = 16384) -> Callable:
  """Held-out MLM loss at each multiple of the training length (None where the model cannot run it)."""
  def evaluate(workdir, config):
    del config
    from posjax.analysis import extrapolation  # pylint: disable=g-import-not-at-top
    rows = extrapolation.evaluate_workdir(workdir, multiples, max_tokens=max_tokens)
    return {f'x{r["multiple"]:g}_loss': r['loss'] for r in rows}
  return evaluate


def glue_evaluation(task: str, directory: str, overrides: dict | None = None) -> Callable:
  """Fine-tunes the variant's run on `task` (its preset, `overrides` on top) in WORKDIR/finetune_TASK and
  returns the dev score (the task's GLUE metric; the mean of its metrics where it has two)."""
  from posjax.finetune import presets  # pylint: disable=g-import-not-at-top
  base = presets.finetune_config(task)  # an unknown task stops here, before any training
  base.data.dir = directory
  for k, v in (overrides or {}).items():
    configs.override(base, k, v, '--glue_set')

  def evaluate(workdir, config):
    del config
    from posjax.finetune import finetuning  # pylint: disable=g-import-not-at-top
    c = base.copy_and_resolve_references()
    c.init_from = workdir
    return {'score': finetuning.finetune_and_evaluate(c, os.path.join(workdir, f'finetune_{task}'))['score']}
  return evaluate


def make_config(size: str, variant: str, steps: int, seed: int = 0, overrides: dict | None = None):
  """The configs/bert.py config of SIZE,VARIANT for `steps` steps, logged every ~steps/40, evaluated and
  checkpointed at the end; `overrides` maps dotted field names to values."""
  from posjax.attention import registry  # pylint: disable=g-import-not-at-top
  if size not in SIZES:
    raise ConfigError(f'unknown size {size!r}; valid sizes: {", ".join(SIZES)}')
  registry.parse(variant)
  c = bert_config.get_config(f'{"tiny" if size == "micro" else size},{variant}')
  if size == 'micro':
    c.model.update(dict(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64))
  c.seed = seed
  c.num_train_steps = steps
  c.warmup_steps = max(1, min(c.warmup_steps, steps // 10))
  c.log_every = max(1, steps // 40)
  c.eval_every = steps
  c.checkpoint_every = steps
  c.keep_checkpoints = 1
  for k, v in {**(MICRO if size == 'micro' else {}), **(overrides or {})}.items():
    configs.override(c, k, v, '--set')
  return c


def workdir_name(variant: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]', '_', variant.replace('+', '-'))


def read_metrics(workdir: str) -> dict[str, list]:
  """metrics.jsonl -> {'step', 'loss', 'accuracy', 'eval_step', 'eval_loss', 'eval_accuracy'} lists."""
  r = {k: [] for k in ('step', 'loss', 'accuracy', 'eval_step', 'eval_loss', 'eval_accuracy')}
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return r
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      m = json.loads(line)
      if 'loss' in m:
        r['step'].append(m['step'])
        r['loss'].append(m['loss'])
        r['accuracy'].append(m.get('accuracy', float('nan')))
      if 'eval_loss' in m:
        r['eval_step'].append(m['step'])
        r['eval_loss'].append(m['eval_loss'])
        r['eval_accuracy'].append(m.get('eval_accuracy', float('nan')))
  return r


def _param_count(config, vocab_size: int) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  from posjax.training import objectives, pretraining  # pylint: disable=g-import-not-at-top
  objective = objectives.make(config, pretraining.model_config(config, vocab_size), config.data.seq_len, 1)
  shapes = jax.eval_shape(objective.init, jax.random.PRNGKey(0))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def _invariance(workdir: str, n: int) -> float | None:
  """Mean tau over heads of the last checkpoint's layer-0 positional attention (None: no such matrix)."""
  from posjax import analysis  # pylint: disable=g-import-not-at-top
  from posjax.analysis import report  # pylint: disable=g-import-not-at-top
  ck = analysis.load(workdir)
  pa = report.summary(ck.config, ck.params, n)['positional_attention']
  return None if pa is None else float(np.mean(pa[0]))


def snapshot_default_corpus(configs, out: str) -> None:
  """Runs on the offline default corpus read it once, from OUT/default_corpus.jsonl.gz (the same documents
  in the same order: the trainer's held-out split and batches are unchanged), instead of re-parsing the
  standard library once per variant."""
  configs = [c for c in configs if not c.data.files]
  if not configs:
    return
  path = os.path.abspath(os.path.join(out, 'default_corpus.jsonl.gz'))
  if not os.path.exists(path):
    import gzip  # pylint: disable=g-import-not-at-top
    from posjax.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
    with gzip.open(path + '.tmp', 'wt', encoding='utf-8') as f:
      for d in corpus_lib.default_corpus().documents:
        f.write(json.dumps({'text': d}) + '\n')
    os.replace(path + '.tmp', path)
  for c in configs:
    c.data.files, c.data.text_field = path, 'text'


COLUMNS = ('variant', 'parameters', 'steps', 'train_loss', 'eval_loss', 'eval_accuracy', 'tau_layer0',
           'seconds')


def run(variants: list[str], size: str, steps: int, out: str, seed: int = 0, overrides: dict | None = None,
        log=print, evaluations: dict[str, Callable] | None = None) -> list[dict]:
  """Trains each variant in OUT/<variant>/ and writes results.md, results.csv and loss_curves.png to OUT.
  `evaluations` add columns like `register_evaluation`'s, for this call only."""
  from posjax.training import pretraining  # pylint: disable=g-import-not-at-top
  if not variants:
    raise ConfigError('--variants is empty; give e.g. absolute,tisa,convfixed')
  if len(set(variants)) != len(variants):
    raise ConfigError(f'--variants names a variant twice: {",".join(variants)}')
  if steps < 1:
    raise ConfigError(f'--steps must be a positive integer; got {steps}')
  configs = {v: make_config(size, v, steps, seed, overrides) for v in variants}  # all errors before training
  os.makedirs(out, exist_ok=True)
  snapshot_default_corpus(configs.values(), out)
  rows, tokenizer = [], None
  for v in variants:
    c, wd = configs[v], os.path.join(out, workdir_name(v))
    if tokenizer is not None and not c.data.tokenizer:
      c.data.tokenizer = tokenizer
    log(f'[compare] {v}: {size}, {steps} steps -> {wd}')
    t0 = time.perf_counter()
    last = pretraining.train_and_evaluate(c, wd)
    seconds = time.perf_counter() - t0
    tokenizer = tokenizer or os.path.join(wd, 'tokenizer.json')
    m = read_metrics(wd)
    from posjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    vocab = tokenizer_lib.load(os.path.join(wd, 'tokenizer.json')).get_vocab_size()
    row = {'variant': v, 'parameters': _param_count(c, vocab), 'steps': steps,
           'train_loss': m['loss'][-1] if m['loss'] else last.get('loss'),
           'eval_loss': m['eval_loss'][-1] if m['eval_loss'] else last.get('eval_loss'),
           'eval_accuracy': m['eval_accuracy'][-1] if m['eval_accuracy'] else last.get('eval_accuracy'),
           'tau_layer0': _invariance(wd, min(c.data.seq_len, 64)), 'seconds': round(seconds, 1)}
    for name, fn in {**_EVALUATIONS, **(evaluations or {})}.items():
      row.update({f'{name}_{k}': val for k, val in fn(wd, c).items()})
    rows.append(row)
    log(f'[compare] {v}: held-out MLM loss {row["eval_loss"]:.4f}, accuracy {row["eval_accuracy"]:.3f} '
        f'({seconds:.0f} s)')
  write_table(rows, out, f'{size}, {steps} steps, seed {seed}')
  from posjax.analysis import plots  # pylint: disable=g-import-not-at-top
  plots.loss_curves({v: read_metrics(os.path.join(out, workdir_name(v))) for v in variants},
                    os.path.join(out, 'loss_curves.png'), f'MLM pretraining: {size}, {steps} steps')
  return rows


def _fmt(v, key: str = '') -> str:
  if v is None:
    return '-'
  if key == 'seconds':
    return f'{v:.0f}'
  if isinstance(v, float):
    return f'{v:.4f}' if abs(v) < 1000 else f'{v:.0f}'
  return f'{v:,}' if isinstance(v, int) and not isinstance(v, bool) else str(v)


def write_table(rows: list[dict], out: str, caption: str) -> None:
  cols = list(COLUMNS) + [k for r in rows for k in r if k not in COLUMNS]
  cols = list(dict.fromkeys(cols))
  with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows([{k: ('' if r.get(k) is None else r.get(k)) for k in cols} for r in rows])
  lines = [f'MLM pretraining, {caption}; held-out numbers on the trainer\'s held-out documents; tau_layer0: '
           'translation invariance of the layer-0 positional attention (1 = Toeplitz; - = none)', '',
           '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  lines += ['| ' + ' | '.join(_fmt(r.get(k), k) for k in cols) + ' |' for r in rows]
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def _parse_set(items: list[str]) -> dict:
  out = {}
  for item in items:
    if '=' not in item:
      raise ConfigError(f'--set {item!r}: write FIELD=VALUE, e.g. --set data.seq_len=64')
    k, v = item.split('=', 1)
    try:
      out[k.strip()] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      out[k.strip()] = v
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog='python -m posjax.compare', description=__doc__.splitlines()[0])
  ap.add_argument('--variants', default=None, help='comma-separated attention variants (default with --quick: '
                  f'{QUICK["variants"]})')
  ap.add_argument('--size', default=None, choices=SIZES, help='model size (default tiny)')
  ap.add_argument('--steps', type=int, default=None, help='training steps per variant (default 600; quick 200)')
  ap.add_argument('--out', required=True, help='directory for the workdirs, tables and plot')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                  help='config override for every variant, e.g. --set data.seq_len=64 (repeatable)')
  ap.add_argument('--extrapolate', default='', metavar='M1,M2',
                  help='add held-out MLM loss at these multiples of the training length, e.g. 2,4')
  ap.add_argument('--glue', default='', metavar='TASK', help='fine-tune each variant on this task, add its score')
  ap.add_argument('--glue_dir', default='', help='GLUE root (CoLA/, SST-2/, ...) or the task\'s directory')
  ap.add_argument('--glue_set', action='append', default=[], metavar='FIELD=VALUE',
                  help='fine-tuning config override, e.g. --glue_set num_train_steps=300 (repeatable)')
  ap.add_argument('--quick', action='store_true',
                  help='tiny model, seq 64, 200 steps: under 10 minutes on 2 CPU cores for 3 variants')
  args = ap.parse_args(argv)
  overrides = dict(QUICK['overrides']) if args.quick else {}
  try:
    overrides.update(_parse_set(args.set))
    variants = [v.strip() for v in (args.variants or (QUICK['variants'] if args.quick else '')).split(',')
                if v.strip()]
    steps = args.steps or (QUICK['steps'] if args.quick else 600)
    evaluations = {}
    if args.extrapolate:
      try:
        multiples = [float(m) for m in args.extrapolate.split(',') if m.strip()]
      except ValueError:
        raise ConfigError(f'--extrapolate {args.extrapolate!r} must be comma-separated numbers, e.g. 2,4') from None
      evaluations['extrapolation'] = extrapolation_evaluation([1.0] + multiples)
    if args.glue:
      if not args.glue_dir:
        raise ConfigError('--glue needs --glue_dir: GLUE\'s root or the task\'s directory of TSV files')
      evaluations[args.glue] = glue_evaluation(args.glue, args.glue_dir, _parse_set(args.glue_set))
    print(host_memory.keep_freed_memory(), file=sys.stderr, flush=True)
    run(variants, args.size or 'tiny', steps, args.out, args.seed, overrides, evaluations=evaluations)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  with open(os.path.join(args.out, 'results.md')) as f:
    print(f.read())
  return 0


if __name__ == '__main__':
  sys.exit(main())
