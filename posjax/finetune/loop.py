"""Fine-tuning: `finetune_and_evaluate(config, workdir)` for one task, `run_all` for every GLUE task.

Pretrained checkpoint -> tokenizer and data (every user error surfaces here, before compilation) -> classifier
whose encoder starts from the checkpoint -> restore the workdir's own latest checkpoint or start -> jitted
steps with logging and checkpoints -> dev metrics (results.json) and GLUE submission files (predictions/).
Batches are a function of (seed, step), so a resumed run continues as the uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from posjax.data import pipeline
from posjax.errors import ConfigError, NonFiniteError
from posjax.finetune import data as data_lib
from posjax.finetune import extrapolation
from posjax.finetune import metrics as metrics_lib
from posjax.finetune import optim, presets, pretrained
from posjax.finetune import tasks as tasks_lib
from posjax.finetune.model import Classifier, encoder_config
from posjax.training import checkpoint, metrics, optimizer, preemption, steps


def validate(config) -> None:
  for name in ('batch_size', 'max_seq_length', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    v = config[name]
    if not isinstance(v, int) or v <= 0:
      raise ConfigError(f'{name} must be a positive integer; got {v!r}')
  if config.num_train_steps < 0 or (config.num_train_steps == 0 and not config.num_epochs > 0):
    raise ConfigError(f'num_epochs must be positive (or num_train_steps > 0); got num_epochs '
                      f'{config.num_epochs!r}, num_train_steps {config.num_train_steps!r}')
  if not config.learning_rate > 0:
    raise ConfigError(f'learning_rate must be positive; got {config.learning_rate!r}')
  if not config.grad_clip_norm > 0:  # 0 would zero every update, a negative norm reverse it
    raise ConfigError(f'grad_clip_norm must be positive; got {config.grad_clip_norm!r}')
  if not 0 <= config.warmup_fraction < 1:
    raise ConfigError(f'warmup_fraction must be in [0, 1); got {config.warmup_fraction!r}')
  if not 0 < config.layer_decay <= 1:
    raise ConfigError(f'layer_decay must be in (0, 1] (1: off); got {config.layer_decay!r}')
  if config.data.source not in data_lib.SOURCES:
    raise ConfigError(f'data.source {config.data.source!r} is not one of {", ".join(data_lib.SOURCES)}')
  if config.nonfinite not in steps.NONFINITE_POLICIES:
    raise ConfigError(f'nonfinite {config.nonfinite!r} is not one of {", ".join(steps.NONFINITE_POLICIES)}')


@dataclasses.dataclass(frozen=True)
class Objective:
  """Cross-entropy (classification) or squared error (regression, STS-B), in `steps.train_step`'s shape."""
  model: Classifier
  regression: bool

  @staticmethod
  def denominators(batch):
    return {'rows': jnp.asarray(len(batch['labels']), jnp.float32)}

  def loss(self, params, batch, rng, deterministic: bool, denominators=None):
    """(loss, metrics): sums over the rows divided by the row count in `denominators` (default: this
    batch's), so micro-batches of one batch add up to the whole batch's values (gradient accumulation)."""
    rows = (denominators or self.denominators(batch))['rows']
    logits_BxC = self.model.apply({'params': params}, batch['ids'], batch['mask'], batch['type_ids'],
                                  deterministic=deterministic, rngs={'dropout': rng})
    if self.regression:
      loss = jnp.sum((logits_BxC[:, 0] - batch['labels']) ** 2) / rows
      return loss, {'loss': loss}
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch['labels']).sum() / rows
    return loss, {'loss': loss, 'accuracy': (logits_BxC.argmax(-1) == batch['labels']).sum() / rows}


def task_directory(task, directory: str) -> str:
  """GLUE's root (holding the task's directory) or the task's own directory."""
  nested = os.path.join(directory, task.glue_dir)
  return nested if directory and os.path.isdir(nested) else directory


def read_examples(task, config):
  """(train Examples, [(dev name, Examples)], [(test split, Examples)])."""
  source, directory = config.data.source, config.data.dir
  if source == 'tsv':
    directory = task_directory(task, directory)
  train = data_lib.read(task, task.train, source, directory)
  if config.data.max_train_examples and config.data.max_train_examples < len(train):
    keep = np.sort(np.random.default_rng([config.seed, 5]).permutation(len(train))[
        :config.data.max_train_examples])
    train = data_lib.Examples(tuple([t[i] for i in keep] for t in train.texts), train.labels[keep],
                              [train.index[i] for i in keep])
  devs = [(name, data_lib.read(task, split, source, directory)) for name, split in task.dev]
  tests = []
  if config.predict_test:
    for split in task.test:
      if source == 'tsv' and not os.path.exists(os.path.join(directory, split.file)):
        logging.warning('%s: no %s in %s; no submission file for it', task.name, split.file, directory)
        continue
      tests.append((split, data_lib.read(task, split, source, directory, labelled=False)))
  return train, devs, tests


def encode_examples(task, config, tok, train, devs, tests):
  """(train arrays, [(dev name, arrays)], [(test split, Examples, arrays)]) encoded to max_seq_length."""
  enc = lambda ex: data_lib.encode(tok, ex, config.max_seq_length)  # noqa: E731
  train_x = {**enc(train), 'labels': train.labels}
  dev_x = [(name, {**enc(ex), 'labels': ex.labels}) for name, ex in devs]
  test_x = [(split, ex, enc(ex)) for split, ex in tests]
  logging.info('%s: %d train, %s dev, %s test examples; max length %d', task.name, len(train),
               ', '.join(f'{n} {len(e)}' for n, e in devs) or '0',
               ', '.join(f'{s.file} {len(e)}' for s, e in tests) or 'no', config.max_seq_length)
  return train_x, dev_x, test_x


def _graft(fresh, pre, path='bert'):
  """The fresh classifier encoder params with every leaf the checkpoint has taken from it (shapes must match);
  the pretraining heads of the checkpoint are dropped."""
  if isinstance(fresh, dict):
    return {k: _graft(v, pre.get(k) if isinstance(pre, dict) else None, f'{path}/{k}') for k, v in fresh.items()}
  if pre is None:
    raise ConfigError(f'the pretrained checkpoint has no parameter {path}')
  if tuple(pre.shape) != tuple(fresh.shape):
    raise ConfigError(f'pretrained parameter {path} has shape {tuple(pre.shape)}, the model needs '
                      f'{tuple(fresh.shape)}')
  return np.asarray(pre, fresh.dtype)


def init_head(shapes, stddev: float, seed: int):
  """Fresh NumPy values for everything but the encoder (BERT's init: N(0, stddev) matrices, zero biases),
  without compiling the model's initialiser."""
  rng = np.random.default_rng([seed, 7])

  def fresh(path, x):
    if getattr(path[0], 'key', None) == 'bert':
      return None
    if getattr(path[-1], 'key', None) == 'kernel':
      return rng.normal(0.0, stddev, x.shape).astype(x.dtype)
    return np.zeros(x.shape, x.dtype)
  return jax.tree_util.tree_map_with_path(fresh, shapes)


def predict(predict_fn, params, arrays, batch_size: int) -> np.ndarray:
  """Logits for every row, in fixed-size batches (the last padded) so one compilation serves all."""
  n = len(arrays['ids'])
  out = []
  for s in range(0, n, batch_size):
    idx = np.arange(s, s + batch_size).clip(max=n - 1)
    out.append(np.asarray(predict_fn(params, *(arrays[k][idx] for k in ('ids', 'mask', 'type_ids')))))
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


def finetune_and_evaluate(config, workdir: str) -> dict:
  """Fine-tunes `config.init_from` on `config.task` in `workdir`, resuming from its latest checkpoint; returns
  {'task', 'step', 'dev': {dev set: {metric: value}}, 'score'} (also written to workdir/results.json)."""
  task = tasks_lib.get(config.task)
  validate(config)
  if config.init_from and os.path.abspath(config.init_from) == os.path.abspath(workdir):
    raise ConfigError('--workdir must differ from --config.init_from (fine-tuning writes its own checkpoints)')
  examples = read_examples(task, config)  # bad files fail before any checkpoint is read
  pre = pretrained.load(config.init_from, config.tokenizer)
  cfg = encoder_config(pre.config)
  if config.hidden_dropout >= 0:
    cfg = dataclasses.replace(cfg, hidden_dropout=config.hidden_dropout, attention_dropout=config.hidden_dropout)
  if extrapolation.position_limit(cfg)[0] is not None and config.max_seq_length > cfg.max_position_embeddings:
    raise ConfigError(f'max_seq_length ({config.max_seq_length}) exceeds the model\'s absolute position table '
                      f'(max_position_embeddings {cfg.max_position_embeddings})')
  logging.info('fine-tuning %s on %s', pre.source, task.name)
  train_x, dev_x, test_x = encode_examples(task, config, pre.tokenizer, *examples)
  os.makedirs(workdir, exist_ok=True)

  n_train = len(train_x['ids'])
  total = config.num_train_steps or max(1, math.ceil(config.num_epochs * max(n_train // config.batch_size, 1)))
  lr = optimizer.warmup_linear_decay(config.learning_rate, round(config.warmup_fraction * total), total)
  model = Classifier(cfg, task.num_labels)
  objective = Objective(model, task.regression)

  seq = config.max_seq_length
  ids = jnp.zeros((1, seq), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, ids, ids)['params'])
  params = init_head(shapes, cfg.initializer_range, config.seed)
  params['bert'] = _graft(shapes['bert'], pre.params)
  scales = optim.layer_scales(params, cfg, config.layer_decay) if config.layer_decay < 1 else None
  tx = optimizer.make(config, lr, scales)

  def init():
    return steps.TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params),
                            rng=jax.random.PRNGKey(config.seed + 1), skipped=jnp.array(0, jnp.int32),
                            first_bad_step=jnp.array(-1, jnp.int32))

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                    jax.eval_shape(init))
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  meta_model = {**cfg.to_dict(), 'task': task.name, 'num_labels': task.num_labels}
  # Batches come from the pretraining input pipeline (grain); its position is saved with every checkpoint.
  train_iter = pipeline.iterator(pipeline.labelled_dataset(train_x, config.batch_size, config.seed))
  state, _ = checkpoint.restore_latest(mngr, abstract, meta_model, workdir, data=train_iter)
  if state is None:
    state = jax.device_put(init(), device)
  else:
    logging.info('resumed from the checkpoint at step %d', int(state.step))
  start = int(state.step)

  train_step = jax.jit(functools.partial(steps.train_step, objective=objective, tx=tx, lr_schedule=lr,
                                         nonfinite=config.nonfinite), donate_argnums=0)
  predict_fn = jax.jit(lambda p, i, m, t: model.apply({'params': p}, i, m, t, deterministic=True))
  writer = metrics.Writer(workdir, resume_step=start)
  meta = {'model': meta_model, 'config': json.loads(config.to_json_best_effort())}

  def evaluate(params):
    dev = {}
    for name, arrays in dev_x:
      preds = _predictions(task, predict(predict_fn, params, arrays, config.batch_size))
      dev[name] = metrics_lib.task_metrics(task.name, preds, arrays['labels'])
    return dev

  logging.info('%d training steps (batch %d, %d examples), warmup %d', total, config.batch_size, n_train,
               round(config.warmup_fraction * total))
  pending = []
  with preemption.StopRequest() as stop:
    for step in range(start, total):
      state, m = train_step(state, next(train_iter))
      pending.append(m)
      done = step + 1
      save = done % config.checkpoint_every == 0 or done == total
      stopping = stop.poll(done, look=done % config.log_every == 0 or save)  # the flag, read once
      save = save or stopping
      if done % config.log_every == 0 or save:
        ms = jax.device_get(pending)
        pending = []
        if config.nonfinite == 'stop' and int(state.first_bad_step) >= 0:
          raise NonFiniteError(f'non-finite loss or gradient norm at step {int(state.first_bad_step)}; stopped '
                               'without applying it (set --config.nonfinite=skip to skip such updates)')
        row = {k: float(np.mean([x[k] for x in ms])) for k in ms[0] if not k.startswith('nonfinite')}
        writer.write(done, row)
        logging.info('step %d/%d: loss %.4f%s', done, total, row['loss'],
                     f', accuracy {row["accuracy"]:.3f}' if 'accuracy' in row else '')
      if config.eval_every and done % config.eval_every == 0 and done != total:
        ev = evaluate(state.params)
        writer.write(done, {f'dev_{n}_{k}': v for n, d in ev.items() for k, v in d.items()})
        logging.info('step %d dev: %s', done, ev)
      if save:
        checkpoint.save(mngr, done, state, meta, train_iter)
      if stopping:
        mngr.wait_until_finished()
        logging.warning('SIGTERM received: wrote the checkpoint at step %d and stopped', done)
        mngr.close()
        writer.close()
        train_iter.close()
        return {'task': task.name, 'step': done, 'stopped': True}
  mngr.wait_until_finished()
  mngr.close()
  train_iter.close()

  dev = evaluate(state.params)
  score = metrics_lib.task_score(task.name, dev)
  writer.write(int(state.step), {**{f'dev_{n}_{k}': v for n, d in dev.items() for k, v in d.items()},
                                 'dev_score': score})
  writer.close()
  results = {'task': task.name, 'step': int(state.step), 'dev': dev, 'score': score, 'init_from': pre.source}
  submissions = []
  for split, examples, arrays in test_x:
    preds = _predictions(task, predict(predict_fn, state.params, arrays, config.batch_size))
    submissions.append(write_submission(task, split, examples, preds, os.path.join(workdir, 'predictions')))
  results['submissions'] = submissions
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  logging.info('%s dev: %s; task score %.2f', task.name, dev, score)
  return results


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
      if k in ('task', 'tasks') or (k in ('num_epochs', 'max_seq_length') and not v):
        continue
      c[k] = v
    r = finetune_and_evaluate(c, os.path.join(workdir, name))
    if r.get('stopped'):
      return r
    scores[name] = r['score']
    table.append((name, r['dev']))
  glue = metrics_lib.glue_score(scores)
  lines = [f'{"task":6s} {"score":>6s}  metrics']
  for name, dev in table:
    ms = ', '.join(f'{n} {k} {v:.2f}' if len(dev) > 1 else f'{k} {v:.2f}' for n, d in dev.items()
                   for k, v in d.items())
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
