"""Pretraining: `train_and_evaluate(config, workdir)`, in the order of flax's lm1b example.

Config -> data and tokenizer (all user errors surface here, before compilation) -> mesh -> abstract state and
its shardings -> restore the latest checkpoint or initialise -> jitted steps -> loop with logging, eval and
checkpoints.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import numpy as np

from posjax.config import ModelConfig
from posjax.data import corpus as corpus_lib
from posjax.data import pieces
from posjax.data import pipeline
from posjax.data import pretrain
from posjax.data import sources
from posjax.data import spm
from posjax.data import tokenizer as tokenizer_lib
from posjax.errors import ConfigError, NonFiniteError
from posjax.models import Bert
from posjax.training import checkpoint, distributed, metrics, optimizer, preemption, sharding, steps


TOKENIZER_KINDS = ('wordpiece', 'sentencepiece')


def validate(config) -> None:
  for name in ('batch_size', 'num_train_steps', 'log_every', 'eval_every', 'eval_batches',
               'checkpoint_every', 'keep_checkpoints', 'grad_accum_steps'):
    v = config[name]
    if not isinstance(v, int) or v <= 0:
      raise ConfigError(f'{name} must be a positive integer; got {v!r}')
  if not config.learning_rate > 0:
    raise ConfigError(f'learning_rate must be positive; got {config.learning_rate!r}')
  if not config.grad_clip_norm > 0:  # 0 would zero every update, a negative norm reverse it
    raise ConfigError(f'grad_clip_norm must be positive; got {config.grad_clip_norm!r}')
  if not 0 < config.data.mask_prob < 1:
    raise ConfigError(f'data.mask_prob must be in (0, 1); got {config.data.mask_prob!r}')
  if config.data.tokenizer_kind not in TOKENIZER_KINDS:
    raise ConfigError(f'data.tokenizer_kind {config.data.tokenizer_kind!r} is not one of '
                      f'{", ".join(TOKENIZER_KINDS)}')
  if not isinstance(config.data.worker_count, int) or config.data.worker_count < 0:
    raise ConfigError(f'data.worker_count must be a non-negative integer; got {config.data.worker_count!r}')
  if not isinstance(config.data.tokenizer_documents, int) or config.data.tokenizer_documents < 0:
    raise ConfigError('data.tokenizer_documents must be a non-negative integer (0: all); got '
                      f'{config.data.tokenizer_documents!r}')
  if not 0 < config.data.eval_fraction < 1:
    raise ConfigError(f'data.eval_fraction must be in (0, 1); got {config.data.eval_fraction!r}')
  if config.data.seq_len > config.model.max_position_embeddings:
    raise ConfigError(f'data.seq_len ({config.data.seq_len}) exceeds model.max_position_embeddings '
                      f'({config.model.max_position_embeddings})')
  if config.nonfinite not in steps.NONFINITE_POLICIES:
    raise ConfigError(f'nonfinite {config.nonfinite!r} is not one of {", ".join(steps.NONFINITE_POLICIES)}')
  if config.objective not in steps.OBJECTIVES:
    raise ConfigError(f'objective {config.objective!r} is not one of {", ".join(steps.OBJECTIVES)}')


def train_tokenizer(config, workdir: str, documents):
  """A vocabulary of data.vocab_size tokens: WordPiece, or (ALBERT) a unigram SentencePiece model saved as
  WORKDIR/spiece.model."""
  logging.info('training a %s vocabulary of %d tokens', config.data.tokenizer_kind, config.data.vocab_size)
  if config.data.tokenizer_kind == 'sentencepiece':
    return spm.train_unigram(documents, config.data.vocab_size, workdir)
  return tokenizer_lib.train_wordpiece(documents, config.data.vocab_size)


def tokenizer_for(config, workdir: str, documents):
  """The workdir's tokenizer if it has one (resume), else the configured one, else a newly trained one."""
  saved = os.path.join(workdir, 'tokenizer.json')
  if os.path.exists(saved):
    return tokenizer_lib.load(saved)
  if config.data.tokenizer.endswith('.model'):
    tok = spm.from_model(config.data.tokenizer, copy_to=workdir if jax.process_index() == 0 else None)
  elif config.data.tokenizer:
    tok = tokenizer_lib.load(config.data.tokenizer)
  elif jax.process_count() > 1:
    # Process 0 trains and the others read its file from the (shared) workdir: one vocabulary on record, which
    # every host (and every resume) tokenises with.
    distributed.everyone(lambda: jax.process_index() == 0 and tokenizer_lib.save(
        train_tokenizer(config, workdir, documents), workdir), 'training the tokenizer')
    if not os.path.exists(saved):
      raise ConfigError(f'{saved} (written by process 0) is not visible to process {jax.process_index()}: a '
                        'multi-host run needs a shared workdir, or set data.tokenizer')
    return tokenizer_lib.load(saved)
  else:
    tok = train_tokenizer(config, workdir, documents)
  if jax.process_index() == 0:
    tokenizer_lib.save(tok, workdir)
  return tok


@dataclasses.dataclass(frozen=True)
class Data:
  train: Any  # grain MapDataset: element s is this process's rows of global batch s
  eval: pipeline.MLMBatches
  max_predictions: int
  vocab_size: int
  specials: pretrain.Specials


def prepare_pieces(config, workdir: str, documents, held_out, tok, body: int):
  """The directory of the corpus's pieces (posjax/data/pieces.py) and their statistics; on several hosts each
  process tokenises its share of the corpus and process 0 joins the parts."""
  data_dir = config.data.data_dir or sources.default_data_dir(workdir)
  directory = pieces.cache_dir(data_dir, documents, config.seed, config.data.eval_fraction, tok, body)
  if jax.process_count() == 1:
    return directory, pieces.prepare(documents, held_out, tok, body, directory)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  index, count = jax.process_index(), jax.process_count()
  # Every process follows process 0's view of the cache, so that all of them reach the same collectives.
  if not multihost_utils.broadcast_one_to_all(np.int32(pieces.exists(directory))):
    distributed.everyone(lambda: pieces.write_part(documents, held_out, tok, body, directory, index, count),
                         'tokenising its share of the corpus')
    distributed.everyone(lambda: index == 0 and pieces.join(directory, count), 'joining the tokenised parts')
  else:
    multihost_utils.sync_global_devices('posjax pieces found')
  if not pieces.exists(directory):
    raise ConfigError(f'data.data_dir: {data_dir} (written by process 0) is not visible to process {index}: a '
                      'multi-host run needs a shared data dir')
  return directory, pieces.read_meta(directory)


def sentence_task(config) -> str | None:
  """The sentence-pair task of the objective's batches ('nsp', 'sop'), or None."""
  return {'mlm+nsp': 'nsp', 'mlm+sop': 'sop'}.get(config.objective)


def build_data(config, workdir: str) -> Data:
  """Documents (a prepared tfds dataset, read record by record) -> tokenizer -> pieces on disk -> the grain
  pipeline; logs the statistics: documents, tokens, examples per epoch, what was skipped and why."""
  documents = sources.open_documents(config.data, workdir)
  held_out = sources.held_out(len(documents), config.seed, config.data.eval_fraction)
  limit = config.data.tokenizer_documents or len(documents)
  tok = tokenizer_for(config, workdir, documents.iter_texts(np.flatnonzero(~held_out)[:limit],
                                                            collections.Counter()))
  specials = pretrain.Specials.from_tokenizer_ids(tokenizer_lib.special_ids(tok))
  vocab = tok.get_vocab_size()
  task = sentence_task(config)
  seq_len = config.data.seq_len
  body = pretrain.body_length(seq_len, task)
  directory, stats = prepare_pieces(config, workdir, documents, held_out, tok, body)
  logging.info('%s: %s%s; vocabulary %d', documents.what, pieces.summary(stats, seq_len),
               f'; {task} pairs' if task else '', vocab)
  if not sum(stats['documents'].values()):
    raise ConfigError(f'data.source={config.data.source}: no usable text in {documents.what} (skipped: '
                      f'{corpus_lib.why(stats["skipped"])})')
  train_x = pipeline.PieceExamples(pieces.Pieces(directory, 'train'), seq_len, specials, task)
  eval_x = pipeline.PieceExamples(pieces.Pieces(directory, 'eval'), seq_len, specials, task)
  eval_fields = eval_x.materialise(config.eval_batches * config.batch_size, config.seed + 1)
  if len(eval_fields['ids']) == 0:
    eval_fields = train_x.materialise(config.batch_size, config.seed + 1)
    logging.warning('held-out documents gave no sequence; evaluating on %d training sequences',
                    len(eval_fields['ids']))
  continuation = pipeline.word_continuations(tok) if config.data.whole_word_masking else None
  masking = pipeline.Masking(specials, vocab, config.data.mask_prob, config.data.max_predictions, continuation)
  train = pipeline.train_dataset(train_x, config.batch_size, config.seed, masking)
  eval_data = pipeline.MLMBatches(eval_fields, config.batch_size, specials, vocab, config.seed,
                                  config.data.mask_prob, config.data.max_predictions or None, continuation)
  return Data(train, eval_data, eval_data.max_predictions, vocab, specials)


# model.vocab_size 0 follows the tokenizer, rounded up: a trained vocabulary has any size (8141, say), and the
# embedding's vocab axis must divide by the mesh axes it is sharded over (tensor parallelism, FSDP).
VOCAB_MULTIPLE = 128


def padded_vocab(vocab_size: int) -> int:
  return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def model_config(config, vocab_size: int) -> ModelConfig:
  d = config.model.to_dict()
  if d['vocab_size'] == 0:
    d['vocab_size'] = padded_vocab(vocab_size)
  elif d['vocab_size'] < vocab_size:
    raise ConfigError(f'model.vocab_size ({d["vocab_size"]}) is smaller than the tokenizer\'s vocabulary '
                      f'({vocab_size}); set it to 0 to follow the tokenizer')
  return ModelConfig.from_dict(d)


@dataclasses.dataclass(frozen=True)
class ShardedSteps:
  """The train state's abstract shape and shardings, its initialiser, and the jitted steps, for one mesh."""
  abstract_state: Any
  state_shardings: Any
  batch_sharding: Any
  init: Any  # () -> TrainState laid out on the mesh
  train_step: Any  # (state, batch) -> (state, metrics); donates state
  eval_step: Any  # (params, batch) -> metrics
  objective: steps.Objective


def sharded_steps(config, objective, tx, lr, mesh, max_predictions: int) -> ShardedSteps:
  """flax lm1b's order: abstract state -> logical specs -> mesh shardings -> jit with those shardings.

  Call under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`."""
  rules = sharding.rules(config)
  sharding.check_batch(config.batch_size, config.grad_accum_steps, mesh, rules)
  init = functools.partial(steps.init_state, objective, tx, config.seed, config.data.seq_len, max_predictions)
  abstract = jax.eval_shape(init)
  sharding.check_params(abstract.params, mesh, rules)
  state_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  batch_shard = sharding.batch_sharding(mesh, config)
  train_step = jax.jit(
      functools.partial(steps.train_step, objective=objective, tx=tx, lr_schedule=lr,
                        nonfinite=config.nonfinite, grad_accum_steps=config.grad_accum_steps),
      in_shardings=(state_shardings, batch_shard), out_shardings=(state_shardings, None), donate_argnums=0)
  eval_step = jax.jit(functools.partial(steps.eval_step, objective=objective),
                      in_shardings=(state_shardings.params, batch_shard))
  return ShardedSteps(abstract, state_shardings, batch_shard,
                      jax.jit(lambda: nn.unbox(init()), out_shardings=state_shardings), train_step, eval_step,
                      objective)


def build_steps(config, mesh, vocab_size: int, max_predictions: int,
                forbidden_ids: tuple[int, ...] = ()) -> ShardedSteps:
  """Model, objective, optimizer and the jitted steps on `mesh`, from the config alone: what
  `train_and_evaluate` runs and `posjax.aot` compiles for TPU topologies (one construction path).
  `forbidden_ids`: token ids ELECTRA's generator never samples ([PAD], [CLS], [SEP]).

  Call under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(sharding.rules(config))`, and trace the steps
  (call or `.lower` them) there too: the model's activation constraints read both."""
  objective = steps.make_objective(config, model_config(config, vocab_size), forbidden_ids=forbidden_ids)
  return sharded_steps(config, objective, optimizer.make(config), optimizer.schedule(config), mesh,
                       max_predictions)


def check_model(config) -> None:
  """Every model error before any data work (tokenising a corpus can take hours): the fields (ModelConfig), then
  the option values each attention component checks where it is built, by an abstract init (shapes only)."""
  probe = ModelConfig.from_dict({**config.model.to_dict(), 'vocab_size': 8})
  ids = np.zeros((1, min(8, probe.max_position_embeddings)), np.int32)
  jax.eval_shape(lambda: Bert(probe).init(jax.random.PRNGKey(0), ids))


def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrains per `config` in `workdir`, resuming from its latest checkpoint; returns the last metrics."""
  validate(config)
  distributed.initialize(config)  # before anything touches a device
  os.makedirs(workdir, exist_ok=True)
  check_model(config)
  data = build_data(config, workdir)
  mcfg = model_config(config, data.vocab_size)
  specials = data.specials

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    setup = build_steps(config, mesh, data.vocab_size, data.max_predictions,
                        forbidden_ids=(specials.pad, specials.cls, specials.sep))
    state_shardings, batch_shard = setup.state_shardings, setup.batch_sharding
    train_step, eval_step = setup.train_step, setup.eval_step

    mngr = checkpoint.manager(workdir, config.keep_checkpoints)
    # Compute dtype and remat policy leave the parameters as they are: a run may resume with others.
    model_meta = {**{k: v for k, v in mcfg.to_dict().items() if k not in ('dtype', 'remat_policy')},
                  'objective': config.objective}
    train_iter = pipeline.iterator(data.train, config.data.worker_count)
    state, _ = checkpoint.restore_latest(
        mngr, checkpoint.abstract_with_shardings(setup.abstract_state, state_shardings), model_meta, workdir,
        data=train_iter)
    if state is None:
      state = setup.init()
      logging.info('initialised %s parameters', f'{sum(x.size for x in jax.tree.leaves(state.params)):,}')
    else:
      logging.info('resumed from the checkpoint at step %d', int(state.step))
    start = int(state.step)

    writer = metrics.Writer(workdir, resume_step=start)
    progress = metrics.Progress(config.num_train_steps, start)
    meta = {'model': model_meta, 'config': json.loads(config.to_json_best_effort())}

    def evaluate(params):
      sums, n = {}, 0
      for b in data.eval.eval_batches(config.eval_batches):
        m = jax.device_get(eval_step(params, sharding.global_batch(sharding.process_rows(b), batch_shard)))
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in m.items()}
        n += 1
      return {f'eval_{k}': v / max(n, 1) for k, v in sums.items()}

    def step_fn(state, step):
      del step  # the iterator stands at it: restored with the checkpoint
      return train_step(state, sharding.global_batch(next(train_iter), batch_shard))

    with preemption.StopRequest() as stop:
      last = _loop(config, state, start, step_fn, evaluate, writer, progress, mngr, meta, stop, train_iter)
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    train_iter.close()  # stops its prefetch thread and worker processes
  return last


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


def _loop(config, state, start, step_fn, evaluate, writer, progress, mngr, meta, stop, data=None):
  """Steps `start`..num_train_steps with logging, eval and checkpoints; on SIGTERM, a checkpoint at the
  current step and an early return. `data`, the training iterator, is saved with each checkpoint. Returns
  the last logged metrics."""
  last, pending = {}, []
  for step in range(start, config.num_train_steps):
    state, m = step_fn(state, step)
    pending.append(m)
    done = step + 1
    log = done % config.log_every == 0 or done == config.num_train_steps
    save = done % config.checkpoint_every == 0 or done == config.num_train_steps
    stopping = stop.poll(done, look=log or save)
    save = save or stopping
    if log or save:
      # Device->host transfers once per logging or checkpoint interval, not per step; nothing is saved
      # before the steps since the last look are known to be finite.
      ms = jax.device_get(pending)
      _check_finite(config, ms, done - len(ms), mngr)
    if log:
      pending = []
      last = {k: float(np.mean([x[k] for x in ms])) for k in ms[0] if not k.startswith('nonfinite')}
      last['learning_rate'] = float(ms[-1]['learning_rate'])
      last['skipped_updates'] = int(state.skipped)
      writer.write(done, last)
      logging.info('step %d/%d: loss %.4f, accuracy %.3f (%s)', done, config.num_train_steps,
                   last['loss'], last['accuracy'], progress.update(done))
    if done % config.eval_every == 0 or done == config.num_train_steps:
      ev = evaluate(state.params)
      writer.write(done, ev)
      last.update(ev)
      logging.info('step %d eval: loss %.4f, accuracy %.3f', done, ev['eval_loss'], ev['eval_accuracy'])
    if save:
      checkpoint.save(mngr, done, state, meta, data)
    if stopping:
      mngr.wait_until_finished()
      logging.warning('SIGTERM received: wrote the checkpoint at step %d and stopped; rerun the same command to '
                      'resume', done)
      break
  return last
