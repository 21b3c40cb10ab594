"""Small configs shared by the tests."""

import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_module(name='bert'):
  spec = importlib.util.spec_from_file_location(f'configs_{name}', os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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
    target = c
    *path, last = k.split('.')
    for p in path:
      target = target[p]
    target[last] = v
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
