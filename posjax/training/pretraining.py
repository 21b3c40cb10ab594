"""Pretraining as a task of the trainer: `train_and_evaluate(config, workdir)`.

The data seam (`posjax.data.inputs.get_datasets`) gives the tokenizer, the batches and the eval set; the
objective (`config.objective`: MLM, MLM+NSP, MLM+SOP, ELECTRA) comes from `posjax.training.objectives`; the
trainer (`posjax.training.trainer`) does the rest.
"""

from __future__ import annotations

import os

from posjax.config import ModelConfig, padded_vocab
from posjax.data import inputs
from posjax.data import pipeline
from posjax.errors import ConfigError
from posjax.training import checkpoint, objectives, optimizer, trainer


def validate(config) -> None:
  """Pretraining's own fields (the trainer checks the shared ones)."""
  if not config.learning_rate > 0:
    raise ConfigError(f'learning_rate must be positive; got {config.learning_rate!r}')
  for name in ('num_train_steps', 'eval_every', 'eval_batches'):
    v = config[name]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise ConfigError(f'{name} must be a positive integer; got {v!r}')
  if isinstance(config.warmup_steps, bool) or not isinstance(config.warmup_steps, int) or config.warmup_steps < 0:
    raise ConfigError(f'warmup_steps must be a non-negative integer; got {config.warmup_steps!r}')
  d = config.data
  trainer.check_seed(d.seed, 'data.seed')
  if isinstance(d.seq_len, bool) or not isinstance(d.seq_len, int) or d.seq_len < 8:
    raise ConfigError(f'data.seq_len must be an integer >= 8; got {d.seq_len!r}')
  if not 0 < d.mask_prob < 1:
    raise ConfigError(f'data.mask_prob must be in (0, 1); got {d.mask_prob!r}')
  if isinstance(d.max_predictions, bool) or not isinstance(d.max_predictions, int) or not (
      0 <= d.max_predictions <= d.seq_len):
    raise ConfigError(f'data.max_predictions must be in [0, data.seq_len={d.seq_len}] (0: ceil(seq_len x '
                      f'mask_prob)); got {d.max_predictions!r}')
  if d.tokenizer_kind not in inputs.TOKENIZER_KINDS:
    raise ConfigError(f'data.tokenizer_kind {d.tokenizer_kind!r} is not one of {", ".join(inputs.TOKENIZER_KINDS)}')
  if not d.tokenizer and (isinstance(d.vocab_size, bool) or not isinstance(d.vocab_size, int)
                          or d.vocab_size < 100):
    raise ConfigError(f'data.vocab_size must be an integer >= 100 (a new vocabulary needs room for its special '
                      f'tokens and characters); got {d.vocab_size!r}')
  if not isinstance(d.worker_count, int) or d.worker_count < 0:
    raise ConfigError(f'data.worker_count must be a non-negative integer; got {d.worker_count!r}')
  if not isinstance(d.tokenizer_documents, int) or d.tokenizer_documents < 0:
    raise ConfigError('data.tokenizer_documents must be a non-negative integer (0: all); got '
                      f'{d.tokenizer_documents!r}')
  if not 0 < d.eval_fraction < 1:
    raise ConfigError(f'data.eval_fraction must be in (0, 1); got {d.eval_fraction!r}')
  if d.seq_len > config.model.max_position_embeddings:
    raise ConfigError(f'data.seq_len ({d.seq_len}) exceeds model.max_position_embeddings '
                      f'({config.model.max_position_embeddings})')
  # Every model error before any data work (tokenising a corpus can take hours): the fields, the attention
  # options' ranges and what each component needs, all checked when a ModelConfig is built.
  ModelConfig.from_dict({**config.model.to_dict(), 'vocab_size': max(config.model.vocab_size, 8)})
  if config.objective not in objectives.OBJECTIVES:
    raise ConfigError(f'objective {config.objective!r} is not one of {", ".join(objectives.OBJECTIVES)}')
  e = config.electra
  if not 0 < e.generator_fraction <= 1:
    raise ConfigError(f'electra.generator_fraction must be in (0, 1]; got {e.generator_fraction!r}')
  if not e.temperature > 0:
    raise ConfigError(f'electra.temperature must be positive; got {e.temperature!r}')
  for name in ('generator_weight', 'discriminator_weight'):
    if not e[name] >= 0:
      raise ConfigError(f'electra.{name} must be >= 0; got {e[name]!r}')


def model_config(config, vocab_size: int) -> ModelConfig:
  """The model config with `model.vocab_size` 0 resolved to the tokenizer's size, padded."""
  d = config.model.to_dict()
  if d['vocab_size'] == 0:
    d['vocab_size'] = padded_vocab(vocab_size)
  elif d['vocab_size'] < vocab_size:
    raise ConfigError(f'model.vocab_size ({d["vocab_size"]}) is smaller than the tokenizer\'s vocabulary '
                      f'({vocab_size}); set it to 0 to follow the tokenizer')
  return ModelConfig.from_dict(d)


def objective_and_optimizer(config, vocab_size: int, max_predictions: int, specials):
  """(objective, tx, lr schedule): what the train step is built from, given the vocabulary and the batches'
  predictions (the data seam's, or an ahead-of-time compile's stand-ins)."""
  objective = objectives.make(config, model_config(config, vocab_size), config.data.seq_len, max_predictions,
                              forbidden_ids=(specials.pad, specials.cls, specials.sep))
  return objective, optimizer.make(config), optimizer.schedule(config)


def abstract_batches(config):
  """(objective, tx, lr, {field: (shape, dtype)}) without any data, for `posjax.aot`: a newly trained
  vocabulary's special ids and size (model.vocab_size when set), the batch fields the pipeline would make."""
  from posjax.data import pretrain  # pylint: disable=g-import-not-at-top
  from posjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  validate(config)
  specials = pretrain.Specials.from_tokenizer_ids({t: i for i, t in enumerate(tokenizer_lib.SPECIAL_TOKENS)})
  vocab = config.model.vocab_size or config.data.vocab_size
  masking = pipeline.Masking(specials, vocab, config.data.mask_prob, config.data.max_predictions)
  fields = pipeline.batch_spec(config.batch_size, config.data.seq_len, inputs.PAIR_TASKS.get(config.objective),
                               masking)
  return (*objective_and_optimizer(config, vocab, fields['positions'][0][1], specials), fields)


def make_task(config, workdir: str) -> trainer.Task:
  data = inputs.get_datasets(config, workdir)
  mcfg = model_config(config, data.vocab_size)
  objective, tx, lr = objective_and_optimizer(config, data.vocab_size, data.max_predictions, data.specials)
  # Compute dtype, remat policy and attention implementation leave the parameters as they are: a run may resume
  # with others.
  model = {**{k: v for k, v in mcfg.to_dict().items() if k not in ('dtype', 'remat_policy', 'attention_impl')},
           'objective': config.objective}

  def evaluate(evaluator, params):
    return evaluator.objective_metrics(params, data.eval.eval_batches(config.eval_batches))

  return trainer.Task(
      name=f'{config.objective} pretraining of {config.get("model_type", "bert")} ({mcfg.attention}): '
           f'{mcfg.num_layers} layers, width {mcfg.hidden_size}, {mcfg.num_heads} heads, length '
           f'{config.data.seq_len}, batch {config.batch_size}, {config.num_train_steps} steps',
      num_steps=config.num_train_steps, objective=objective, train_iter=pipeline.iterator(data.train, config.data.worker_count),
      tx=tx, lr=lr, model=model, evaluate=evaluate,
      meta={'tokenizer_sha256': checkpoint.file_digest(os.path.join(workdir, 'tokenizer.json'))})


def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrains per `config` in `workdir`, resuming from its latest checkpoint; returns the last evaluation."""
  validate(config)
  return trainer.train(config, workdir, make_task)
