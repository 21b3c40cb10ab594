"""Compare attention variants: pretrain each with identical data and vocabulary under several model seeds,
then tabulate means, spreads and differences.

    python -m posjax.compare --variants absolute,tisa,convfixed --size tiny --steps 600 --seeds 0,1,2 --out runs/cmp
    python -m posjax.compare --preset quick --out runs/quick          # 3 variants, tiny, < 10 min on 2 CPU cores
    python -m posjax.compare --preset reproduce --out runs/reproduce  # the papers' comparison (README, Evidence)

Every (variant, seed) is trained by the ordinary trainer (`posjax.training.pretraining.train_and_evaluate`)
from the config `bert:SIZE,VARIANT` gives (posjax/configs/bert.py), in OUT/<variant>/seed<N>/, with `seed`
= N (initialisation, dropout) and `data.seed` fixed (`--data_seed`, default 0: the held-out documents, the
vocabulary, the example order and the masks), so the runs of a comparison differ only in their model and its
seed. The corpus is prepared and tokenised once, in OUT/data/, and the vocabulary trained once (saved in the
first run's workdir, read by the others), before the first run. Runs go seed by seed (every variant of seed 0, then of seed 1, ...), so a
stopped comparison has every variant.

Written to OUT after every run: results.md and results.csv (per variant, over its seeds: the mean, the
standard deviation and the range of every measured column, and the difference of each mean to the first
variant's in units of the pooled seed standard deviation, marked where it is larger than the seed spread;
with the reproduce preset, each paper's claim with its verdict: in the claimed direction or not, by how many
seed standard deviations),
runs.csv (one row per run) and loss_curves.png (the mean over seeds, the band their range). Columns:
parameters, final training loss, held-out MLM loss and accuracy, translation invariance of the layer-0
positional attention, training seconds.

Rerunning resumes the runs that did not finish and reuses those that did (no computation; their training
time is the one their record in WORKDIR/compare.json holds). A SIGTERM/SIGINT during a run saves its
checkpoint and stops the comparison with one line and exit status 0; the same command resumes it.

Optional columns: `--extrapolate 2,4` adds the held-out MLM loss at those multiples of the training length
(`posjax.analysis.extrapolation`; absolute embeddings show `-` past their table), and `--glue TASK
--glue_dir DIR` fine-tunes each pretrained run on a GLUE task (or IMDB) with that task's preset (learning
rate and layer decay by model size), the run's model seed and data seed, in WORKDIR/finetune_TASK, and adds
its dev metrics, its score, its seconds and where its test-set predictions were written (`--glue_set
FIELD=VALUE` overrides the fine-tuning config, e.g. num_train_steps=300). `register_evaluation(name, fn)`
adds more: fn(workdir, config) -> dict of values, called after each run.
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
from posjax.errors import ConfigError, Error
from posjax.training import host_memory

# posjax/configs/bert.py's sizes, plus `micro` (1 layer, width 32, feed-forward 64) for tests and notebooks.
SIZES = ('micro',) + tuple(bert_config.SIZES)
MICRO = {'data.vocab_size': 1000, 'data.seq_len': 32, 'batch_size': 16, 'model.hidden_dropout': 0.0,
         'model.attention_dropout': 0.0, 'learning_rate': 3e-3, 'eval_batches': 2}

# Named recipes; `{data}` in a value is the --data folder. Flags given on the command line win.
PRESETS = {
    'quick': dict(variants='absolute,tisa,convfixed', size='tiny', steps=200, seeds='0', overrides={
        'data.seq_len': 64, 'batch_size': 32, 'data.vocab_size': 4096, 'warmup_steps': 20, 'eval_batches': 4}),
    # The three papers' claims at a size 2 CPU cores train in about an hour: learned absolute positions
    # (BERT) against TISA without absolute positions (Wennberg & Henter's setting), Chang et al.'s composite
    # attention without absolute positions, and ConvBERT's mixed attention, which keeps BERT's absolute
    # embeddings (ConvBERT's own models do: the comparison is then of the attention alone). MLM on the
    # 50,000 unlabelled IMDB reviews, then SST-2 (500 steps at length 64, learning rate by size), 3 seeds.
    'reproduce': dict(
        variants='absolute,tisa,convfixed+convq+convk,absolute+convbert', size='tiny', steps=2000,
        seeds='0,1,2', overrides={
            'data.files': '{data}/imdb/imdb_unsup.jsonl.gz', 'data.seq_len': 64, 'batch_size': 32,
            'data.vocab_size': 8192, 'warmup_steps': 200, 'eval_batches': 32},
        glue='sst2', glue_dir='{data}/sst2', glue_set={'num_train_steps': 500, 'data.seq_len': 64},
        claims=(
            ('absolute', 'tisa', 'Wennberg & Henter 2021: TISA without absolute positions does at least as well '
             'as learned absolute positions.'),
            ('absolute', 'convfixed+convq+convk', "Chang et al. 2021: composite attention without absolute "
             "positions improves on BERT's absolute positions."),
            ('absolute', 'absolute+convbert', "Jiang et al. 2020: ConvBERT's mixed attention improves on BERT's "
             'self-attention.'))),
}
DEFAULT_DATA = os.path.join('..', 'shared', 'data')

# Columns that describe a run rather than measure it: no spread, no difference.
FIXED = ('seed', 'data_seed', 'steps', 'parameters')
COLUMNS = ('variant', 'seed', 'data_seed', 'parameters', 'steps', 'train_loss', 'eval_loss', 'eval_accuracy',
           'tau_layer0', 'seconds')
# A difference of means is "larger than the seed spread" when it exceeds this many pooled standard deviations.
SPREADS = 2.0

_EVALUATIONS: dict[str, Callable] = {}


def log(message: str) -> None:
  print(f'[compare] {message}', file=sys.stderr, flush=True)


def register_evaluation(name: str, fn: Callable) -> None:
  """Adds columns to the table: fn(workdir, config) -> {column: value}, run after each run trains."""
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
  """Fine-tunes the run in WORKDIR/finetune_TASK on `task` (its preset, the run's seed and data seed,
  `overrides` on top) and returns its dev metrics, score, seconds, where its test predictions went and, if
  its dev predictions collapsed onto one class, which. A finished fine-tuning is read back, not redone."""
  from posjax.finetune import data as data_lib  # pylint: disable=g-import-not-at-top
  from posjax.finetune import presets, tasks  # pylint: disable=g-import-not-at-top
  overrides = dict(overrides or {})
  base = presets.finetune_config(task)  # an unknown task stops here, before any training
  base.data.dir = directory
  for k, v in overrides.items():
    configs.override(base, k, v, '--glue_set')
  if base.data.source == 'tsv':  # missing files stop here too, not after the first pretraining
    train = os.path.join(data_lib.task_directory(tasks.get(task), directory), tasks.get(task).train.file)
    if not os.path.isfile(train):
      raise ConfigError(f'--glue_dir {directory!r}: no {train} (give GLUE\'s root or the task\'s directory)')

  def evaluate(workdir, config):
    from posjax.finetune import finetuning  # pylint: disable=g-import-not-at-top
    c = base.copy_and_resolve_references()
    c.init_from = workdir
    if 'seed' not in overrides:
      c.seed = config.seed
    if 'data.seed' not in overrides:
      c.data.seed = config.data.seed
    wd = os.path.join(workdir, f'finetune_{task}')
    seconds, reused = timed(wd, c, lambda: finetuning.finetune_and_evaluate(c, wd))
    with open(os.path.join(wd, 'results.json')) as f:
      r = json.load(f)
    return {**r['dev'], 'score': r['score'], 'seconds': seconds,
            'predictions': ', '.join(r['submissions']) or None,
            'collapsed': '; '.join(f'{x["class"]} ({100 * x["share"]:.0f}%)' for x in r.get('collapsed', []))
                         or None}
  return evaluate


def make_config(size: str, variant: str, steps: int, seed: int = 0, overrides: dict | None = None,
                data_seed: int = 0):
  """The configs/bert.py config of SIZE,VARIANT for `steps` steps with model seed `seed` and data seed
  `data_seed`, logged every ~steps/40, evaluated and checkpointed at the end; `overrides` maps dotted field
  names to values."""
  from posjax.attention import registry  # pylint: disable=g-import-not-at-top
  if size not in SIZES:
    raise ConfigError(f'unknown size {size!r}; valid sizes: {", ".join(SIZES)}')
  registry.parse(variant)
  c = bert_config.get_config(f'{"tiny" if size == "micro" else size},{variant}')
  if size == 'micro':
    c.model.update(dict(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64))
  c.seed = seed
  c.data.seed = data_seed
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


def run_dir(out: str, variant: str, seed: int = 0) -> str:
  """The workdir of `variant` trained with model seed `seed` in the comparison at `out`."""
  return os.path.join(out, workdir_name(variant), f'seed{seed}')


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


def timed(workdir: str, config, train: Callable[[], object]) -> tuple[float, bool]:
  """Runs `train` unless WORKDIR/compare.json records that this config finished there; returns (the run's
  training seconds, summed over every call that trained it, and whether it was reused). Written before a
  stop (trainer.Stopped) is passed on, so a resumed run adds to the seconds already spent."""
  path = os.path.join(workdir, 'compare.json')
  identity = json.loads(config.to_json_best_effort())
  identity.get('data', {}).pop('tokenizer', None)  # the path to the shared vocabulary: content is checked
  record = {}
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
  if record.get('finished') and record.get('config') == identity:
    return record['seconds'], True
  t0 = time.perf_counter()
  finished = False
  try:
    train()
    finished = True
  finally:
    seconds = record.get('seconds', 0.0) + time.perf_counter() - t0
    if os.path.isdir(workdir):
      with open(path + '.tmp', 'w') as f:
        json.dump({'config': identity, 'seconds': seconds, 'finished': finished}, f)
      os.replace(path + '.tmp', path)
  return seconds, False


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


def prepare_data(plan: list[tuple[str, int]], configs_: dict, out: str) -> None:
  """Before any run, once per data seed: the corpus prepared and tokenised in OUT/data (unless data.data_dir
  is set, or the corpus is a tfds catalog dataset, prepared where it is) and the vocabulary trained in the
  first run's workdir, where that run finds it; the other runs of the data seed are pointed at it. So no run's
  time includes the data's preparation, and every run reads the same files."""
  from posjax.data import inputs  # pylint: disable=g-import-not-at-top
  tokenizers = {}
  for v, s in plan:
    c = configs_[(v, s)]
    if not c.data.data_dir and c.data.source != 'tfds':
      c.data.data_dir = os.path.abspath(os.path.join(out, 'data'))
    if c.data.seed in tokenizers:
      c.data.tokenizer = c.data.tokenizer or tokenizers[c.data.seed]
      continue
    wd = run_dir(out, v, s)
    log(f'data seed {c.data.seed}: preparing the corpus, the vocabulary ({wd}) and the tokenised pieces')
    os.makedirs(wd, exist_ok=True)
    inputs.get_datasets(c, wd)
    tokenizers[c.data.seed] = os.path.abspath(os.path.join(wd, 'tokenizer.json'))


def _parse_seeds(text: str, flag: str = '--seeds') -> list[int]:
  try:
    seeds = [int(s) for s in str(text).split(',') if s.strip()]
  except ValueError:
    raise ConfigError(f'{flag} {text!r} must be comma-separated integers, e.g. 0,1,2') from None
  if not seeds or len(set(seeds)) != len(seeds) or any(not 0 <= s < 2**31 for s in seeds):
    raise ConfigError(f'{flag} {text!r} must name distinct integers in [0, 2**31), e.g. 0,1,2')
  return seeds


def run(variants: list[str], size: str, steps: int, out: str, seeds=(0,), overrides: dict | None = None,
        evaluations: dict[str, Callable] | None = None, data_seed: int | str = 0, claims=()) -> list[dict]:
  """Trains each variant with each model seed in OUT/<variant>/seed<N>/ and writes results.md, results.csv,
  runs.csv and loss_curves.png to OUT; returns the rows of the runs. `data_seed`: the data seed of every run,
  or 'each': the run's model seed. `evaluations` add columns like `register_evaluation`'s, for this call only.
  `claims`: (baseline, variant, statement) triples whose verdicts results.md states (see claim_lines).
  Raises trainer.Stopped when a run was stopped by a signal (its checkpoint saved)."""
  from posjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from posjax.training import metrics, pretraining  # pylint: disable=g-import-not-at-top
  if not variants:
    raise ConfigError('--variants is empty; give e.g. absolute,tisa,convfixed')
  if len(set(variants)) != len(variants):
    raise ConfigError(f'--variants names a variant twice: {",".join(variants)}')
  if steps < 1:
    raise ConfigError(f'--steps must be a positive integer; got {steps}')
  seeds = _parse_seeds(','.join(map(str, seeds)))
  if data_seed != 'each' and (isinstance(data_seed, bool) or not isinstance(data_seed, int) or data_seed < 0):
    raise ConfigError(f'--data_seed must be a non-negative integer or "each"; got {data_seed!r}')
  plan = [(v, s) for s in seeds for v in variants]
  configs_ = {(v, s): make_config(size, v, steps, s, overrides, s if data_seed == 'each' else data_seed)
              for v, s in plan}  # every config error before any training
  os.makedirs(out, exist_ok=True)
  evaluations = {**_EVALUATIONS, **(evaluations or {})}
  rows, spent, started = [], [], time.perf_counter()  # spent: the times of the runs trained in this call
  prepare_data(plan, configs_, out)
  data_seeds = sorted({c.data.seed for c in configs_.values()})
  caption = (f'{size}, {steps} steps, model seeds {", ".join(map(str, seeds))}, data seed'
             f'{"s" if len(data_seeds) > 1 else ""} {", ".join(map(str, data_seeds))}')
  for i, (v, s) in enumerate(plan, 1):
    c, wd = configs_[(v, s)], run_dir(out, v, s)
    log(f'run {i}/{len(plan)}: {v}, seed {s}: {size}, {steps} steps -> {wd}')
    t0 = time.perf_counter()
    seconds, reused = timed(wd, c, lambda: pretraining.train_and_evaluate(c, wd))  # pylint: disable=cell-var-from-loop
    m = read_metrics(wd)
    vocab = tokenizer_lib.load(os.path.join(wd, 'tokenizer.json')).get_vocab_size()
    row = {'variant': v, 'seed': s, 'data_seed': c.data.seed, 'parameters': _param_count(c, vocab),
           'steps': steps, 'train_loss': m['loss'][-1] if m['loss'] else None,
           'eval_loss': m['eval_loss'][-1] if m['eval_loss'] else None,
           'eval_accuracy': m['eval_accuracy'][-1] if m['eval_accuracy'] else None,
           'tau_layer0': _invariance(wd, min(c.data.seq_len, 64)), 'seconds': round(seconds, 1)}
    for name, fn in evaluations.items():
      row.update({f'{name}_{k}': val for k, val in fn(wd, c).items()})
    rows.append(row)
    if not reused:
      spent.append(time.perf_counter() - t0)
    extra = ''.join(f', {k} {row[k]:.2f}' for k in row if k.endswith('_score') and row[k] is not None)
    rate = f'{steps / seconds:.2f} steps/s, ' if seconds and not reused else ''
    left = len(plan) - i
    log(f'run {i}/{len(plan)}: {v}, seed {s}: held-out MLM loss {_fmt(row["eval_loss"])}, accuracy '
        f'{_fmt(row["eval_accuracy"])}{extra} ({"reused; trained in " if reused else ""}'
        f'{metrics.duration(seconds)}, {rate}with evaluations {metrics.duration(time.perf_counter() - t0)}); '
        f'overall {i}/{len(plan)} runs in {metrics.duration(time.perf_counter() - started)}'
        + (f', ETA {metrics.duration(np.mean(spent) * left)}' if left and spent else ''))
    write_tables(rows, out, caption, claims)
  from posjax.analysis import plots  # pylint: disable=g-import-not-at-top
  plots.loss_curves({v: [read_metrics(run_dir(out, v, s)) for s in seeds] for v in variants},
                    os.path.join(out, 'loss_curves.png'), f'MLM pretraining: {caption}')
  return rows


def _numeric(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def summarise(rows: list[dict]) -> tuple[list[str], list[dict]]:
  """(the measured columns, one dict per variant in order of appearance): for each measured column `col`,
  col_mean, col_std (sample standard deviation over seeds; None for one seed), col_min, col_max, and for
  every variant after the first col_delta (its mean minus the first's), col_sigmas (delta over the pooled
  standard deviation sqrt((s1^2 + s2^2) / 2)) and col_beyond_spread (|delta| > SPREADS pooled std)."""
  cols = [k for k in dict.fromkeys(k for r in rows for k in r)
          if k not in FIXED and k != 'variant' and all(_numeric(r[k]) for r in rows if r.get(k) is not None)
          and any(r.get(k) is not None for r in rows)]
  groups = {}
  for r in rows:
    groups.setdefault(r['variant'], []).append(r)
  out = []
  for variant, runs in groups.items():
    s = {'variant': variant, 'seeds': len(runs)}
    for k in ('parameters', 'steps'):
      values = {r.get(k) for r in runs}
      s[k] = values.pop() if len(values) == 1 else None
    for k in cols:
      x = np.asarray([r[k] for r in runs if r.get(k) is not None], np.float64)
      s.update({f'{k}_mean': float(x.mean()) if len(x) else None,
                f'{k}_std': float(x.std(ddof=1)) if len(x) > 1 else None,
                f'{k}_min': float(x.min()) if len(x) else None, f'{k}_max': float(x.max()) if len(x) else None,
                f'{k}_n': len(x)})
    out.append(s)
  for s in out[1:]:
    for k in cols:
      s.update({f'{k}_{name}': value for name, value in _versus(s, out[0], k).items()})
  return cols, out


def _versus(s: dict, base: dict, k: str) -> dict:
  """Column k of variant summary `s` against `base`'s: delta (of the means), sigmas (delta over the pooled
  standard deviation) and beyond_spread (|delta| > SPREADS pooled std); the last two only with spreads."""
  if s.get(f'{k}_mean') is None or base.get(f'{k}_mean') is None:
    return {}
  delta = s[f'{k}_mean'] - base[f'{k}_mean']
  if s[f'{k}_std'] is None or base[f'{k}_std'] is None:
    return {'delta': delta}
  pooled = float(np.sqrt((s[f'{k}_std'] ** 2 + base[f'{k}_std'] ** 2) / 2))
  sigmas = delta / pooled if pooled else (0.0 if delta == 0 else float(np.copysign(np.inf, delta)))
  return {'delta': delta, 'sigmas': sigmas, 'beyond_spread': abs(delta) > SPREADS * pooled}


def claim_lines(summary: list[dict], cols: list[str], claims) -> list[str]:
  """A line per claim (baseline, variant, statement) whose two variants ran: for the held-out MLM loss (lower
  is better) and every fine-tuning score (higher is better), both means, their difference, whether it is in
  the claimed direction and how many pooled seed standard deviations it is."""
  by_name = {s['variant']: s for s in summary}
  lines = []
  for base, variant, statement in claims:
    if base not in by_name or variant not in by_name:
      continue
    s, b, parts = by_name[variant], by_name[base], []
    for k, better in [('eval_loss', -1)] + [(c, 1) for c in cols if c.endswith('_score')]:
      v = _versus(s, b, k)
      if not v:
        continue
      what = 'held-out MLM loss' if k == 'eval_loss' else f'{k[:-len("_score")]} dev score'
      way = 'in the claimed direction' if v['delta'] * better > 0 else 'against the claimed direction'
      spread = ('one seed, no spread' if 'sigmas' not in v else
                f'{abs(v["sigmas"]):.1f}σ, {"beyond" if v["beyond_spread"] else "within"} the seed spread')
      parts.append(f'{what} {_fmt(s[f"{k}_mean"], k)} vs {_fmt(b[f"{k}_mean"], k)} '
                   f'(Δ {"+" if v["delta"] >= 0 else ""}{_fmt(v["delta"], k, s[f"{k}_mean"])}, {way}, {spread})')
    lines.append(f'- **{statement}** ({variant} against {base}) ' + '; '.join(parts) + '.')
  return lines


def _fmt(v, key: str = '', like=None) -> str:
  """A table cell; a float gets the decimals its size (or the size of `like`, e.g. the mean beside a
  standard deviation) calls for."""
  if v is None or (isinstance(v, float) and np.isnan(v)):
    return '-'
  if key.endswith('seconds'):
    return f'{v:.0f}'
  if _numeric(v) and isinstance(v, (float, np.floating)):
    size = abs(v if like is None else like)
    return f'{v:.4f}' if size < 10 else f'{v:.2f}' if size < 1000 else f'{v:.0f}'
  return f'{v:,}' if _numeric(v) else str(v)


def _spread(s: dict, k: str) -> str:
  if s.get(f'{k}_mean') is None:
    return '-'
  if s.get(f'{k}_std') is None:
    return _fmt(s[f'{k}_mean'], k)
  mean = s[f'{k}_mean']
  return (f'{_fmt(mean, k)} ± {_fmt(s[f"{k}_std"], k, mean)} '
          f'[{_fmt(s[f"{k}_min"], k, mean)}, {_fmt(s[f"{k}_max"], k, mean)}]')


def _difference(s: dict, k: str) -> str:
  if f'{k}_delta' not in s:
    return '-'
  d = s[f'{k}_delta']
  text = f'{"+" if d >= 0 else ""}{_fmt(d, k, s[f"{k}_mean"])}'
  if f'{k}_sigmas' in s:
    text += f' ({s[f"{k}_sigmas"]:+.1f}σ){" *" if s[f"{k}_beyond_spread"] else ""}'
  return text


def write_tables(rows: list[dict], out: str, caption: str, claims=()) -> None:
  """results.md (means ± std [range], each claim's verdict, differences to the first variant, every run),
  results.csv (the summary per variant) and runs.csv (every run) in `out`. `claims`: (baseline, variant,
  statement) triples, see claim_lines."""
  cols, summary = summarise(rows)
  run_cols = list(dict.fromkeys(list(COLUMNS) + [k for r in rows for k in r]))
  with open(os.path.join(out, 'runs.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=run_cols)
    w.writeheader()
    w.writerows([{k: ('' if r.get(k) is None else r.get(k)) for k in run_cols} for r in rows])
  sum_cols = list(dict.fromkeys(k for s in summary for k in s if not k.endswith('_n')))
  with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=sum_cols)
    w.writeheader()
    w.writerows([{k: ('' if s.get(k) is None else s.get(k)) for k in sum_cols} for s in summary])
  first = summary[0]['variant']
  lines = [f'MLM pretraining, {caption}; held-out numbers on the trainer\'s held-out documents (the same for '
           'every run of a data seed); tau_layer0: translation invariance of the layer-0 positional attention '
           '(1 = Toeplitz; - = none); seconds: training time of the run (reused runs: their own).', '',
           'Mean ± standard deviation [min, max] over the seeds:', '',
           '| variant | seeds | parameters | ' + ' | '.join(cols) + ' |', '|' + '---|' * (len(cols) + 3)]
  lines += [f'| {s["variant"]} | {s["seeds"]} | {_fmt(s["parameters"])} | ' +
            ' | '.join(_spread(s, k) for k in cols) + ' |' for s in summary]
  claimed = claim_lines(summary, cols, claims)
  if claimed:
    lines += ['', 'Claim by claim:', ''] + claimed
  if len(summary) > 1:
    lines += ['', f'Difference of the means to {first} (σ: the pooled seed standard deviation, sqrt((s1² + '
              f's2²) / 2); * where |Δ| > {SPREADS:g}σ, a difference larger than the seed spread):', '',
              '| variant | ' + ' | '.join(cols) + ' |', '|' + '---|' * (len(cols) + 1)]
    lines += [f'| {s["variant"]} | ' + ' | '.join(_difference(s, k) for k in cols) + ' |' for s in summary[1:]]
  lines += ['', 'Every run:', '', '| ' + ' | '.join(run_cols) + ' |', '|' + '---|' * len(run_cols)]
  lines += ['| ' + ' | '.join(_fmt(r.get(k), k) for k in run_cols) + ' |' for r in rows]
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


def _with_data(value, data: str):
  if isinstance(value, dict):
    return {k: _with_data(v, data) for k, v in value.items()}
  return value.replace('{data}', data) if isinstance(value, str) else value


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog='python -m posjax.compare', description=__doc__.splitlines()[0])
  ap.add_argument('--preset', default='', choices=('',) + tuple(PRESETS),
                  help='a named recipe (quick: 3 variants, tiny, < 10 min; reproduce: the papers\' comparison, '
                  'under two hours on 2 CPU cores); flags given here override it')
  ap.add_argument('--quick', action='store_true', help='the same as --preset quick')
  ap.add_argument('--variants', default=None, help='comma-separated attention variants')
  ap.add_argument('--size', default=None, choices=SIZES, help='model size (default tiny)')
  ap.add_argument('--steps', type=int, default=None, help='training steps per run (default 600)')
  ap.add_argument('--out', required=True, help='directory for the workdirs, tables and plot')
  ap.add_argument('--seeds', default=None, help='comma-separated model seeds, e.g. 0,1,2 (default 0)')
  ap.add_argument('--data_seed', default='0', help='the data seed of every run (default 0), or "each": the '
                  'run\'s model seed (then the vocabulary and held-out set change with it)')
  ap.add_argument('--data', default=DEFAULT_DATA, help='the folder holding imdb/imdb_unsup.jsonl.gz and sst2/ '
                  '(the reproduce preset; default %(default)s)')
  ap.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                  help='config override for every run, e.g. --set data.seq_len=64 (repeatable)')
  ap.add_argument('--extrapolate', default='', metavar='M1,M2',
                  help='add held-out MLM loss at these multiples of the training length, e.g. 2,4')
  ap.add_argument('--glue', default=None, metavar='TASK', help='fine-tune each run on this task, add its scores')
  ap.add_argument('--glue_dir', default=None, help='GLUE root (CoLA/, SST-2/, ...) or the task\'s directory')
  ap.add_argument('--glue_set', action='append', default=[], metavar='FIELD=VALUE',
                  help='fine-tuning config override, e.g. --glue_set num_train_steps=300 (repeatable)')
  args = ap.parse_args(argv)
  name = args.preset or ('quick' if args.quick else '')
  preset = _with_data(PRESETS.get(name, {}), args.data)
  from posjax.training import trainer  # pylint: disable=g-import-not-at-top
  try:
    if '{data}' in repr(PRESETS.get(name)) and not os.path.isdir(args.data):
      raise ConfigError(f'--preset {name} reads its corpora from --data {args.data!r}, which is not a directory; '
                        'point --data at the folder holding imdb/imdb_unsup.jsonl.gz and sst2/')
    overrides = {**preset.get('overrides', {}), **_parse_set(args.set)}
    variants = [v.strip() for v in (args.variants or preset.get('variants', '')).split(',') if v.strip()]
    steps = args.steps or preset.get('steps', 600)
    seeds = _parse_seeds(args.seeds or preset.get('seeds', '0'))
    data_seed = args.data_seed
    if data_seed != 'each':
      if not data_seed.isdigit() or int(data_seed) >= 2**31:
        raise ConfigError(f'--data_seed {data_seed!r} must be an integer in [0, 2**31) or "each"')
      data_seed = int(data_seed)
    evaluations = {}
    if args.extrapolate:
      try:
        multiples = [float(m) for m in args.extrapolate.split(',') if m.strip()]
      except ValueError:
        raise ConfigError(f'--extrapolate {args.extrapolate!r} must be comma-separated numbers, e.g. 2,4') from None
      evaluations['extrapolation'] = extrapolation_evaluation([1.0] + multiples)
    glue = preset.get('glue', '') if args.glue is None else args.glue
    if glue:
      glue_dir = args.glue_dir if args.glue_dir is not None else preset.get('glue_dir', '')
      if not glue_dir:
        raise ConfigError('--glue needs --glue_dir: GLUE\'s root or the task\'s directory of TSV files')
      evaluations[glue] = glue_evaluation(glue, glue_dir, {**preset.get('glue_set', {}),
                                                           **_parse_set(args.glue_set)})
    from posjax import cli  # pylint: disable=g-import-not-at-top
    cli.setup_logging('posjax compare')  # the trainer's progress lines
    log(host_memory.keep_freed_memory())
    run(variants, args.size or preset.get('size', 'tiny'), steps, args.out, seeds, overrides,
        evaluations=evaluations, data_seed=data_seed, claims=preset.get('claims', ()))
  except trainer.Stopped as e:
    log(f'stopped: {e}; the finished runs are kept')
    return e.exit_code
  except Error as e:
    print(f'error: {e}', file=sys.stderr)
    return e.exit_code
  with open(os.path.join(args.out, 'results.md')) as f:
    print(f.read())
  return 0


if __name__ == '__main__':
  from posjax import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_tpu_probe()
  sys.exit(main())
