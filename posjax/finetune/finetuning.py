"""Fine-tuning as a task of the trainer: `finetune_and_evaluate(config, workdir)` for one task, `run_all` for
every GLUE task.

Pretrained checkpoint -> tokenizer and data (every user error surfaces here, before compilation) -> the
classifier objective, whose encoder the trainer warm-starts from the checkpoint -> the trainer (mesh, resume,
loop, checkpoints) -> dev metrics (results.json) and GLUE submission files (predictions/).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from absl import logging
import flax.linen as nn
import jax
import numpy as np

from posjax.analysis import extrapolation
from posjax.data import pipeline
from posjax.errors import ConfigError
from posjax.finetune import data as data_lib
from posjax.finetune import metrics as metrics_lib
from posjax import pretrained
from posjax.finetune import optim, presets
from posjax.finetune import tasks as tasks_lib
from posjax.finetune.model import Classification, Classifier, encoder_config
from posjax.training import optimizer, trainer


def validate(config) -> None:
  """Fine-tuning's own fields (the trainer checks the shared ones; num_train_steps 0 means num_epochs)."""
  if isinstance(config.data.seq_len, bool) or not isinstance(config.data.seq_len, int) or config.data.seq_len < 4:
    raise ConfigError(f'data.seq_len must be an integer >= 4; got {config.data.seq_len!r}')
  if config.num_train_steps < 0 or (config.num_train_steps == 0 and not config.num_epochs > 0):
    raise ConfigError(f'num_epochs must be positive (or num_train_steps > 0); got num_epochs '
                      f'{config.num_epochs!r}, num_train_steps {config.num_train_steps!r}')
  if not 0 <= config.warmup_fraction < 1:
    raise ConfigError(f'warmup_fraction must be in [0, 1); got {config.warmup_fraction!r}')
  if not config.learning_rate >= 0:
    raise ConfigError(f'learning_rate must be positive (0: by the model\'s width); got {config.learning_rate!r}')
  if not 0 <= config.layer_decay <= 1:
    raise ConfigError(f'layer_decay must be in (0, 1] (1: off; 0: by the model\'s depth); got '
                      f'{config.layer_decay!r}')
  if not (config.hidden_dropout == -1 or 0 <= config.hidden_dropout < 1):
    raise ConfigError(f'hidden_dropout must be in [0, 1) (or -1: the pretrained model\'s); got '
                      f'{config.hidden_dropout!r}')
  trainer.check_seed(config.data.seed, 'data.seed')
  if config.data.source not in data_lib.SOURCES:
    raise ConfigError(f'data.source {config.data.source!r} is not one of {", ".join(data_lib.SOURCES)}')


def predict(predict_fn, params, arrays, batch_size: int) -> np.ndarray:
  """Logits for every row, in fixed-size batches (the last padded) so one compilation serves all."""
  n = len(arrays['ids'])
  out = []
  for s in range(0, n, batch_size):
    idx = np.arange(s, s + batch_size).clip(max=n - 1)
    out.append(predict_fn(params, {k: arrays[k][idx] for k in ('ids', 'mask', 'type_ids')}))
  return np.concatenate(out)[:n]


def _predictions(task, logits_NxC):
  return logits_NxC[:, 0] if task.regression else logits_NxC.argmax(-1)


def write_submission(task, split, examples, preds, directory: str) -> str:
  """GLUE's submission format: `index<TAB>prediction`, labels as GLUE spells them, STS-B clipped to [0, 5]."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, split.submission)
  with open(path, 'w', encoding='utf-8') as f:
    f.write('index\tprediction\n')
    for i, p in zip(examples.index, preds):
      f.write(f'{i}\t{float(np.clip(p, 0.0, 5.0)):.3f}\n' if task.regression else f'{i}\t{task.labels[int(p)]}\n')
  return path


# A classifier whose dev predictions are this much one class (where the labels are not) has stopped using
# its input: usually a learning rate too low (or too high) for the model's size.
COLLAPSE_SHARE = 0.95


def collapsed(task, preds: dict[str, np.ndarray], dev: dict[str, dict]) -> list[dict]:
  """[{'dev': name, 'class': label, 'share': of the predictions, 'label_share': of the labels}] for each dev
  set whose predictions collapsed onto one class (empty: none did); each is logged as a warning."""
  out = []
  for name, p in preds.items():
    counts = np.bincount(np.asarray(p, np.int64), minlength=task.num_labels)
    top = int(counts.argmax())
    share, label_share = counts[top] / max(len(p), 1), float(np.mean(dev[name]['labels'] == top))
    if share >= COLLAPSE_SHARE and label_share < COLLAPSE_SHARE:
      out.append({'dev': name, 'class': task.labels[top], 'share': float(share), 'label_share': label_share})
      logging.warning('%s %s: %.1f%% of the %d predictions are class %r (%.1f%% of the labels): the classifier '
                      'collapsed to one class; try another learning rate (learning_rate, layer_decay)',
                      task.name, name, 100 * share, len(p), task.labels[top], 100 * label_share)
  return out


def flat_dev(dev: dict[str, dict[str, float]]) -> dict[str, float]:
  """{dev set: {metric: value}} -> {metric: value} for a task with one dev set, {set_metric: value} else."""
  if len(dev) == 1:
    return dict(next(iter(dev.values())))
  return {f'{name}_{k}': v for name, d in dev.items() for k, v in d.items()}


def graft(fresh, pre, path='bert'):
  """The pretrained encoder's values for the classifier's encoder parameters `fresh` (shapes must match);
  the pretraining heads of the checkpoint are dropped."""
  if isinstance(fresh, dict):
    return {k: graft(v, pre.get(k) if isinstance(pre, dict) else None, f'{path}/{k}') for k, v in fresh.items()}
  if pre is None:
    raise ConfigError(f'the pretrained checkpoint has no parameter {path}')
  if tuple(pre.shape) != tuple(fresh.shape):
    raise ConfigError(f'pretrained parameter {path} has shape {tuple(pre.shape)}, the model needs '
                      f'{tuple(fresh.shape)}')
  return np.asarray(pre, fresh.dtype)


def encoder(config, pre):
  """The pretrained model's encoder config, with the configured dropout, checked against data.seq_len."""
  cfg = encoder_config(pre.config)
  if config.hidden_dropout >= 0:
    cfg = dataclasses.replace(cfg, hidden_dropout=config.hidden_dropout, attention_dropout=config.hidden_dropout)
  if extrapolation.position_limit(cfg)[0] is not None and config.data.seq_len > cfg.max_position_embeddings:
    raise ConfigError(f'data.seq_len ({config.data.seq_len}) exceeds the model\'s absolute position table '
                      f'(max_position_embeddings {cfg.max_position_embeddings})')
  return cfg


def objective_and_optimizer(config, cfg, task, total: int):
  """(objective, tx, lr schedule) of fine-tuning `cfg`'s encoder on `task` for `total` steps, with the
  learning rate and layer decay of `presets.scaled`."""
  peak, decay, _ = presets.scaled(config, cfg.hidden_size, cfg.num_layers)
  lr = optimizer.warmup_linear_decay(peak, round(config.warmup_fraction * total), total)
  objective = Classification(Classifier(cfg, task.num_labels), config.data.seq_len, task.regression)
  scales = None
  if decay < 1:
    shapes = nn.unbox(jax.eval_shape(objective.init, jax.random.PRNGKey(0)))
    scales = optim.layer_scales(shapes, cfg, decay)
  return objective, optimizer.make(config, lr, scales), lr


def abstract_batches(config):
  """(objective, tx, lr, {field: (shape, dtype)}) without the task's data, for `posjax.aot` (the pretrained
  model is read from config.init_from for its shapes)."""
  task = tasks_lib.get(config.task)
  validate(config)
  cfg = encoder(config, pretrained.load(config.init_from, config.tokenizer, need_tokenizer=False))
  b, l = config.batch_size, config.data.seq_len
  fields = {k: ((b, l), np.dtype(np.int32)) for k in ('ids', 'mask', 'type_ids')}
  fields['labels'] = ((b,), np.dtype(np.float32 if task.regression else np.int32))
  return (*objective_and_optimizer(config, cfg, task, max(config.num_train_steps, 1)), fields)


def make_task(config, workdir: str) -> trainer.Task:
  task = tasks_lib.get(config.task)
  if config.init_from and os.path.abspath(config.init_from) == os.path.abspath(workdir):
    raise ConfigError('--workdir must differ from --config.init_from (fine-tuning writes its own checkpoints)')
  examples = data_lib.read_examples(task, config)  # bad files fail before any checkpoint is read
  pre = pretrained.load(config.init_from, config.tokenizer)
  cfg = encoder(config, pre)
  seq_len = config.data.seq_len
  logging.info('fine-tuning %s on %s', pre.source, task.name)
  train_x, dev_x, test_x = data_lib.encode_examples(task, config, pre.tokenizer, *examples)

  n = len(train_x['ids'])
  total = config.num_train_steps or max(1, math.ceil(config.num_epochs * max(n // config.batch_size, 1)))
  warmup = round(config.warmup_fraction * total)
  peak, decay, chosen = presets.scaled(config, cfg.hidden_size, cfg.num_layers)
  if chosen:
    logging.info('%s', chosen)
  objective, tx, lr = objective_and_optimizer(config, cfg, task, total)

  latest = {}  # the last evaluation per dev set, for the task score

  def evaluate(evaluator, params):
    predict_fn = evaluator.function(objective.logits)
    latest['preds'] = {name: _predictions(task, predict(predict_fn, params, arrays, config.batch_size))
                       for name, arrays in dev_x}
    latest['dev'] = {name: metrics_lib.task_metrics(task.name, latest['preds'][name], arrays['labels'])
                     for name, arrays in dev_x}
    return flat_dev(latest['dev'])

  def finish(evaluator, params, last):
    del last  # the trainer evaluates at the last step: `latest` holds it per dev set
    dev = latest['dev']
    score = metrics_lib.task_score(task.name, dev)
    results = {'task': task.name, 'step': total, 'dev': flat_dev(dev), 'score': score, 'init_from': pre.source,
               'learning_rate': peak, 'layer_decay': decay}
    if not task.regression:
      results['collapsed'] = collapsed(task, latest['preds'], dict(dev_x))
    predict_fn = evaluator.function(objective.logits)
    results['submissions'] = [
        write_submission(task, split, ex, _predictions(task, predict(predict_fn, params, arrays, config.batch_size)),
                         os.path.join(workdir, 'predictions'))
        for split, ex, arrays in test_x] if jax.process_index() == 0 else []
    if jax.process_index() == 0:
      with open(os.path.join(workdir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=2)
    logging.info('%s dev: %s; task score %.2f', task.name, results['dev'], score)
    return results

  return trainer.Task(
      name=f'fine-tuning on {task.name}: {total} steps (batch {config.batch_size}, {n} examples, length '
           f'{seq_len}), warmup {warmup}',
      num_steps=total, objective=objective,
      train_iter=pipeline.iterator(pipeline.labelled_dataset(train_x, config.batch_size, config.data.seed)),
      tx=tx, lr=lr,
      model={**cfg.to_dict(), 'task': task.name, 'num_labels': task.num_labels},
      evaluate=evaluate, finish=finish,
      warm_start=lambda shapes: {k: graft(v, pre.params) if k == 'bert' else jax.tree.map(lambda _: None, v)
                                 for k, v in shapes.items()})


def finetune_and_evaluate(config, workdir: str) -> dict:
  """Fine-tunes `config.init_from` on `config.task` in `workdir`, resuming from its latest checkpoint; returns
  {'task', 'step', 'dev': {metric: value} (per dev set where there are several), 'score', ...}, also written
  to workdir/results.json."""
  tasks_lib.get(config.task)
  validate(config)
  return trainer.train(config, workdir, make_task)


def run_all(config, workdir: str) -> dict:
  """Every task of `config.tasks` in workdir/TASK with its own preset (epochs, length) and the shared fields
  of `config`; prints a table and the GLUE score, written to workdir/glue.json."""
  names = [t.strip() for t in config.tasks.split(',') if t.strip()]
  for t in names:
    tasks_lib.get(t)
  shared = config.to_dict()
  scores, table = {}, []
  for name in names:
    c = presets.finetune_config(name)
    for k, v in shared.items():
      if k in ('task', 'tasks') or (k == 'num_epochs' and not v):
        continue
      if k == 'data':
        c.data.update({dk: dv for dk, dv in v.items() if not (dk == 'seq_len' and not dv)})
        continue
      c[k] = v
    r = finetune_and_evaluate(c, os.path.join(workdir, name))
    scores[name] = r['score']
    table.append((name, r['dev']))
  glue = metrics_lib.glue_score(scores)
  lines = [f'{"task":6s} {"score":>6s}  metrics']
  for name, dev in table:
    ms = ', '.join(f'{k} {v:.2f}' for k, v in dev.items())
    lines.append(f'{name:6s} {scores[name]:6.2f}  {ms}')
  if 'glue' in glue:
    lines.append(f'GLUE score (mean of task scores, WNLI excluded as in BERT/ELECTRA dev tables): '
                 f'{glue["glue"]:.2f}')
  if 'glue_with_wnli' in glue:
    lines.append(f'GLUE score over all {glue["tasks"]} GLUE tasks run (WNLI included): {glue["glue_with_wnli"]:.2f}')
  print('\n'.join(lines))
  out = {'tasks': {n: {'dev': d, 'score': scores[n]} for n, d in table}, **glue}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'glue.json'), 'w') as f:
    json.dump(out, f, indent=2)
  return out


def run(config, workdir: str) -> dict:
  return run_all(config, workdir) if config.task == 'all' else finetune_and_evaluate(config, workdir)
