"""Small configs shared by the tests."""

import importlib
import os

import numpy as np

from posjax import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_module(name='bert'):
  return importlib.import_module(f'posjax.configs.{name}')


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a process with `devices` CPU devices that keeps the suite's own flags (conftest.py)."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()


def micro_config(arg='tiny', **overrides):
  """BERT-tiny shrunk so a few dozen steps take seconds on 2 CPU cores."""
  c = load_config_module('bert').get_config(arg)
  c.model.hidden_size = 32
  c.model.num_heads = 2
  c.model.intermediate_size = 64
  c.model.num_layers = 1
  c.model.hidden_dropout = 0.0
  c.model.attention_dropout = 0.0
  c.data.vocab_size = 1000
  c.data.seq_len = 32
  c.batch_size = 16
  c.num_train_steps = 40
  c.warmup_steps = 5
  c.learning_rate = 3e-3
  c.log_every = 5
  c.eval_every = 20
  c.eval_batches = 2
  c.checkpoint_every = 20
  for k, v in overrides.items():
    configs.override(c, k, v)
  return c


def padded_batch(seed=0, vocab=101):
  """(ids, mask, type_ids), 3x17: one full row, two padded ones, two segments; for HF parity tests."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, size=(3, 17))
  mask = np.ones_like(ids)
  mask[1, 11:] = 0
  mask[2, 5:] = 0
  ids[mask == 0] = 0
  types = (np.arange(17)[None, :] >= 8).astype(np.int64).repeat(3, 0) * mask
  return ids, mask, types


def unmask(batch):
  """A masked MLM batch's ids with the original tokens put back at its masked positions."""
  ids = batch['ids'].copy()
  r, c = np.nonzero(batch['weights'])
  ids[r, batch['positions'][r, c]] = batch['labels'][r, c]
  return ids


class ListPieces:
  """posjax.data.pieces.Pieces in memory: the pieces (`pretrain.chunk`) of token-id documents."""

  def __init__(self, docs, body):
    from posjax.data import pretrain  # pylint: disable=g-import-not-at-top
    self.body = body
    self.items = [(d, c) for d, ids in enumerate(docs) for c in pretrain.chunk(ids, body)]

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    return self.items[i][1]

  def document(self, i):
    return self.items[i][0]


def init_state(objective, tx, seed=0):
  """The TrainState the trainer starts from (logical-axis boxes removed), on one device."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from posjax.training import steps  # pylint: disable=g-import-not-at-top
  return jax.jit(lambda: nn.unbox(steps.init_state(tx, seed, steps.init_params(objective, seed))))()


def mlm_objective(config, vocab=100, max_predictions=4):
  """Pretraining's objective for `config` (a micro_config) with a `vocab`-token model."""
  from posjax.training import objectives, pretraining  # pylint: disable=g-import-not-at-top
  return objectives.make(config, pretraining.model_config(config, vocab), config.data.seq_len, max_predictions)


def random_params(init, *args, seed=0, scale=0.3, ones_at=''):
  """Parameters for `init(rng, *args)` (a module's `init`) drawn from N(0, scale^2), plus 1 where the path
  holds `ones_at` (e.g. 'scale': LayerNorm scales about 1), so that every position term visibly matters.
  Shapes come from `jax.eval_shape` and values from NumPy: compiling flax's initialisers costs seconds."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  shapes = nn.unbox(jax.eval_shape(init, jax.random.PRNGKey(0), *args)['params'])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (float(bool(ones_at) and ones_at in jax.tree_util.keystr(path)) +
                       scale * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
