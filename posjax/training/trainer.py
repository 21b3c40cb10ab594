"""The one trainer, for every task: `train(config, workdir, make_task)`, in the order of flax's lm1b example.

    config -> the task: its data and objective (every user error surfaces here, before compilation)
           -> mesh -> abstract train state and its shardings -> jitted sharded steps
           -> restore the latest checkpoint, or initialise (with the task's warm start)
           -> loop: step, progress, metrics, evaluation, checkpoints, the stop request
           -> the task's report

A task brings an objective (`steps.Objective`), a savable batch iterator, its optimizer and an evaluation; the
trainer owns the rest: mesh and shardings, restore-or-init, the jitted step, metrics.jsonl, TensorBoard (and W&B),
orbax checkpoints with checksums and the iterator's position, the workdir lock, SIGTERM/SIGINT (agreed across
processes), the non-finite policy. Pretraining (posjax/training/pretraining.py) and fine-tuning
(posjax/finetune/finetuning.py) are its two tasks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import numpy as np
import optax

from posjax.errors import ConfigError, Error, NonFiniteError, WriteError
from posjax.training import checkpoint, distributed, metrics, preemption, sharding, steps
from posjax.training import workdir as workdir_lib


class Stopped(Error):
  """The run stopped on SIGTERM/SIGINT after writing a checkpoint; rerunning the command resumes it."""
  exit_code = 0


@dataclasses.dataclass
class Task:
  """What one kind of training brings to the trainer."""
  name: str  # for the log, e.g. 'MLM pretraining of bert (tisa)'
  num_steps: int  # the step to train to
  objective: steps.Objective
  train_iter: Any  # grain iterator (get_state / set_state / close): this process's rows of each global batch
  tx: optax.GradientTransformation
  lr: optax.Schedule
  model: dict  # what a checkpoint must have been written for: resuming from another model is refused
  evaluate: Callable[['Evaluator', Any], dict[str, float]]  # (evaluator, params) -> scalars, logged as eval_*
  # (abstract params) -> a tree like them of NumPy arrays (None: keep the initial value), e.g. pretrained weights
  warm_start: Callable[[Any], Any] | None = None
  # (evaluator, params, last evaluation) -> the run's results, e.g. fine-tuning's results.json and submissions
  finish: Callable[['Evaluator', Any, dict], dict] | None = None
  meta: dict = dataclasses.field(default_factory=dict)  # more JSON saved with every checkpoint


def check_seed(value, name: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
    raise ConfigError(f'{name} must be an integer in [0, 2**31); got {value!r}')


def validate(config) -> None:
  """The fields every trainer config has (the tasks check their own)."""
  for name in ('batch_size', 'log_every', 'checkpoint_every', 'keep_checkpoints',
               'grad_accum_steps'):
    v = config[name]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise ConfigError(f'{name} must be a positive integer; got {v!r}')
  if isinstance(config.eval_every, bool) or not isinstance(config.eval_every, int) or config.eval_every < 0:
    raise ConfigError(f'eval_every must be a non-negative integer (0: at the end only); got {config.eval_every!r}')
  check_seed(config.seed, 'seed')
  if not config.grad_clip_norm > 0:  # 0 would zero every update, a negative norm reverse it
    raise ConfigError(f'grad_clip_norm must be positive; got {config.grad_clip_norm!r}')
  for name in ('adam_b1', 'adam_b2'):
    if not 0 <= config[name] < 1:
      raise ConfigError(f'{name} must be in [0, 1); got {config[name]!r}')
  if not config.adam_eps > 0:
    raise ConfigError(f'adam_eps must be positive; got {config.adam_eps!r}')
  if not config.weight_decay >= 0:
    raise ConfigError(f'weight_decay must be >= 0; got {config.weight_decay!r}')
  if config.nonfinite not in steps.NONFINITE_POLICIES:
    raise ConfigError(f'nonfinite {config.nonfinite!r} is not one of {", ".join(steps.NONFINITE_POLICIES)}')
  metrics.check_loggers(config)


@dataclasses.dataclass(frozen=True)
class ShardedSteps:
  """The train state's abstract shape and shardings, its initialisers, and the jitted steps, for one mesh."""
  abstract_state: Any
  state_shardings: Any
  batch_sharding: Any
  init_params: Any  # () -> the objective's initial parameters laid out on the mesh
  init_state: Any  # (params) -> TrainState laid out on the mesh; donates params
  train_step: Any  # (state, batch) -> (state, metrics); donates state
  eval_step: Any  # (params, batch) -> metrics


def sharded_steps(config, objective: steps.Objective, tx, lr, mesh) -> ShardedSteps:
  """flax lm1b's order: abstract state -> logical specs -> mesh shardings -> jit with those shardings. What a
  run executes and what `posjax.aot` compiles for a TPU topology.

  Call under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`."""
  rules = sharding.rules(config)
  sharding.check_batch(config.batch_size, config.grad_accum_steps, mesh, rules)
  params_fn = functools.partial(steps.init_params, objective, config.seed)
  abstract = jax.eval_shape(lambda: steps.init_state(tx, config.seed, params_fn()))
  sharding.check_params(abstract.params, mesh, rules)
  state_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  batch_shard = sharding.batch_sharding(mesh, config)
  train_step = jax.jit(
      functools.partial(steps.train_step, objective=objective, tx=tx, lr_schedule=lr,
                        nonfinite=config.nonfinite, grad_accum_steps=config.grad_accum_steps),
      in_shardings=(state_shardings, batch_shard), out_shardings=(state_shardings, None), donate_argnums=0)
  eval_step = jax.jit(functools.partial(steps.eval_step, objective=objective),
                      in_shardings=(state_shardings.params, batch_shard))
  return ShardedSteps(
      abstract, state_shardings, batch_shard,
      jax.jit(lambda: nn.unbox(params_fn()), out_shardings=state_shardings.params),
      jax.jit(lambda p: nn.unbox(steps.init_state(tx, config.seed, p)), in_shardings=(state_shardings.params,),
              out_shardings=state_shardings, donate_argnums=0),
      train_step, eval_step)


class Evaluator:
  """Evaluation on the trainer's mesh: host batches (global, as every process holds them) in, host values out."""

  def __init__(self, setup: ShardedSteps, mesh):
    self._setup = setup
    self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def shard(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A global host batch -> arrays on the mesh (each process contributes its rows)."""
    return sharding.global_batch(sharding.process_rows(batch), self._setup.batch_sharding)

  def objective_metrics(self, params, batches) -> dict[str, float]:
    """The objective's metrics (deterministic) averaged over `batches`."""
    sums, n = {}, 0
    for b in batches:
      m = jax.device_get(self._setup.eval_step(params, self.shard(b)))
      sums = {k: sums.get(k, 0.0) + float(v) for k, v in m.items()}
      n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}

  def function(self, fn: Callable[[Any, dict], Any]) -> Callable[[Any, dict[str, np.ndarray]], np.ndarray]:
    """fn(params, batch) jitted on the mesh; the returned function takes a global host batch and returns
    NumPy values every process holds."""
    jitted = jax.jit(fn, in_shardings=(self._setup.state_shardings.params, self._setup.batch_sharding),
                     out_shardings=self._replicated)
    return lambda params, batch: jax.tree.map(np.asarray, jitted(params, self.shard(batch)))


def _place(value: np.ndarray, target: jax.Array) -> jax.Array:
  """A host array (every process holds all of it) laid out like `target`."""
  if tuple(value.shape) != tuple(target.shape):
    raise ConfigError(f'warm start: an array of shape {tuple(value.shape)} for a parameter of shape '
                      f'{tuple(target.shape)}')
  value = np.asarray(value, target.dtype)
  return jax.make_array_from_callback(value.shape, target.sharding, lambda index: value[index])


def initial_state(setup: ShardedSteps, warm_start=None):
  params = setup.init_params()
  if warm_start is not None:
    values = warm_start(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    params = jax.tree.map(lambda p, v: p if v is None else _place(v, p), params, values,
                          is_leaf=lambda x: x is None)
  return setup.init_state(params)


def train(config, workdir: str, make_task: Callable[[Any, str], Task]) -> dict:
  """Runs `make_task(config, workdir)`'s task in `workdir`, resuming from its latest checkpoint; returns the
  task's results (or the last metrics). Raises `Stopped` after a SIGTERM/SIGINT has been saved."""
  validate(config)
  with preemption.StopRequest() as stop:
    distributed.initialize(config)  # before anything touches a device
    workdir_lib.check(workdir)
    lock = distributed.everyone(lambda: jax.process_index() == 0 and workdir_lib.lock(workdir),
                                'locking the workdir')
    try:
      task = make_task(config, workdir)
      try:
        return _train(config, workdir, task, stop)
      finally:
        task.train_iter.close()  # stops its prefetch thread and worker processes
    except Error:
      raise
    except Exception as e:  # pylint: disable=broad-except  (a full disk, wherever a write found it)
      if not checkpoint.is_disk_full(e):
        raise
      path = getattr(e, 'filename', None) or workdir
      free = shutil.disk_usage(path if os.path.exists(path) else workdir).free
      raise WriteError(f'{path}: no space left on device ({checkpoint.human_bytes(free)} free); free some space '
                       'and rerun the command to resume') from None
    finally:
      if lock:
        lock.release()


def _train(config, workdir: str, task: Task, stop: preemption.StopRequest) -> dict:
  mesh = sharding.make_mesh(config.mesh)
  logging.info('%s', task.name)
  logging.info('mesh: %s over %d %s device(s) in %d process(es); config: %s', ', '.join(
      f'{a}={n}' for a, n in mesh.shape.items()), mesh.size, jax.default_backend(), jax.process_count(),
               os.path.join(workdir, 'config.json'))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1) + '\n')
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config)):
    setup = sharded_steps(config, task.objective, task.tx, task.lr, mesh)
    evaluator = Evaluator(setup, mesh)
    mngr = checkpoint.manager(workdir, config.keep_checkpoints)
    try:
      state, _ = checkpoint.restore_latest(
          mngr, checkpoint.abstract_with_shardings(setup.abstract_state, setup.state_shardings), task.model,
          workdir, data=task.train_iter, tokenizer_digest=task.meta.get('tokenizer_sha256'))
      if state is None:
        state = initial_state(setup, task.warm_start)
        logging.info('initialised %s parameters', f'{sum(x.size for x in jax.tree.leaves(state.params)):,}')
      else:
        logging.info('resumed from the checkpoint at step %d', int(state.step))
      meta = {'model': task.model, 'config': json.loads(config.to_json_best_effort()), **task.meta}
      state, last = _loop(config, workdir, task, setup, evaluator, state, mngr, meta, stop)
      mngr.wait_until_finished()
    finally:
      mngr.close()
    if stop.requested:
      raise Stopped(f'{stop.name} received: wrote the checkpoint at step {int(state.step)} and stopped; rerun '
                    'the same command to resume')
    return task.finish(evaluator, state.params, last) if task.finish else last


def _check_finite(config, metrics_per_step, first_step, mngr):
  """Under nonfinite='stop', the first NaN/Inf of the interval ends training before anything is saved."""
  if config.nonfinite != 'stop':
    return
  for i, m in enumerate(metrics_per_step):
    bad = [q for q in ('loss', 'grad_norm') if m[f'nonfinite_{q}']]
    if bad:
      mngr.wait_until_finished()
      good = mngr.latest_step()
      raise NonFiniteError(
          f'non-finite {" and ".join(bad)} at step {first_step + i + 1}; stopped (nonfinite=stop) without '
          f'applying it. The last good checkpoint is step {good}' + ('' if good is not None else ' (none)') +
          "; set --config.nonfinite=skip to skip such updates instead")


def _loop(config, workdir, task: Task, setup: ShardedSteps, evaluator: Evaluator, state, mngr, meta,
          stop: preemption.StopRequest):
  """Steps from the state's step to the task's last with logging, evaluation and checkpoints; on a stop
  request, a checkpoint at the current step and an early return. Returns (state, the last logged training
  metrics and evaluation)."""
  total, start = task.num_steps, int(state.step)
  writer = metrics.Writer(workdir, resume_step=start, config=config)
  last_row, last_eval = {}, {}
  try:
    if start >= total:
      logging.warning('the checkpoint is at step %d and the run has %d steps: nothing left to train (raise '
                      '--config.num_train_steps to train further)', start, total)
      last_eval = {f'eval_{k}': v for k, v in task.evaluate(evaluator, state.params).items()}
      return state, last_eval
    progress, pending = None, []
    for step in range(start, total):
      state, m = setup.train_step(state, sharding.global_batch(next(task.train_iter), setup.batch_sharding))
      pending.append(m)
      done = step + 1
      if not stop.armed:  # compiled and stepped once: from here a signal ends in a checkpoint
        jax.block_until_ready(state.step)
        stop.arm()
        progress = metrics.Progress(total, done)  # rates and ETA without the compilation
      log = done % config.log_every == 0 or done == total
      save = done % config.checkpoint_every == 0 or done == total
      stopping = stop.poll(done, look=log or save)
      save = save or stopping
      if log or save:
        # Device->host transfers once per logging or checkpoint interval, not per step; nothing is saved
        # before the steps since the last look are known to be finite.
        ms = jax.device_get(pending)
        _check_finite(config, ms, done - len(ms), mngr)
      if log:
        pending = []
        row = {k: float(np.mean([x[k] for x in ms])) for k in ms[0] if not k.startswith('nonfinite')}
        row['learning_rate'] = float(ms[-1]['learning_rate'])
        row['skipped_updates'] = int(state.skipped)
        writer.write(done, row)
        last_row = row
        acc = f', accuracy {row["accuracy"]:.3f}' if 'accuracy' in row else ''
        logging.info('step %d/%d: loss %.4f%s (%s)', done, total, row['loss'], acc, progress.update(done))
      if (config.eval_every and done % config.eval_every == 0) or done == total:
        last_eval = {f'eval_{k}': v for k, v in task.evaluate(evaluator, state.params).items()}
        writer.write(done, last_eval)
        logging.info('step %d eval: %s', done, metrics.format_scalars(last_eval))
      if save:
        checkpoint.save(mngr, done, state, meta, task.train_iter)
      if stopping:
        mngr.wait_until_finished()
        break
    return state, {**last_row, **last_eval}
  finally:
    writer.close()
