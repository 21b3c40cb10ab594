"""The pretraining input pipeline: document pieces on disk -> examples -> masked batches, by grain.

    examples = PieceExamples(pieces.Pieces(directory, 'train'), seq_len, specials, task=None)
    train = train_dataset(examples, batch_size, seed, masking)  # grain MapDataset of local batches
    it = iterator(train, worker_count)  # its get_state() goes into the orbax checkpoint

Order, sentence pairs and masks are fixed by the seed alone. The global example order is a seeded permutation
per epoch (grain `shuffle` then `repeat`); each example is made (`[CLS] piece [SEP]`, or a sentence pair for
NSP/SOP) and masked with a generator keyed by the seed and its position in that endless stream (`random_map`),
so pairs and masks are fresh every epoch. Global batch `s` is stream positions `s*B .. s*B+B-1`; process `i` of
`n` reads the i-th of its n slices (grain `ShardOptions` of `jax.process_index()` / `process_count()` over
local batches), so the global batch, and so training, is the same for any number of processes, and each reads,
makes and masks only its own rows."""

from __future__ import annotations

import dataclasses
import os
import threading
import time

from absl import flags
import grain
import numpy as np

from posjax.data import pretrain
from posjax.errors import ConfigError

class Rows:
  """Examples that are made already: element `i` is row `i` of `fields` (ids NxL, and any per-example
  arrays: type_ids NxL, sentence_labels N, ...)."""

  def __init__(self, fields):
    self.fields = fields
    self.seq_len = fields['ids'].shape[1]

  def __len__(self):
    return len(self.fields['ids'])

  def __getitem__(self, i):
    return {k: v[i] for k, v in self.fields.items()}

  def example(self, i, rng):
    del rng  # nothing to draw
    return self[i]


class PieceExamples:
  """Examples made from document pieces (posjax/data/pieces.py) as the stream reads them: `[CLS] piece [SEP]`,
  or, for `task` 'nsp' / 'sop', a sentence pair (`pretrain.pair`) drawn afresh from each epoch's generator."""

  NSP_TRIES = 8  # draws of a piece from another document before the pair stays in order (label 0)

  def __init__(self, pieces, seq_len: int, specials: pretrain.Specials, task: str | None = None):
    if pieces.body != pretrain.body_length(seq_len, task):
      raise ValueError(f'pieces of {pieces.body} tokens do not fit sequences of {seq_len} (task {task})')
    self.pieces, self.seq_len, self.specials, self.task = pieces, seq_len, specials, task

  def __len__(self):
    return len(self.pieces)

  def example(self, i, rng):
    piece = self.pieces[i]
    if self.task is None:
      return {'ids': pretrain.single(piece, self.seq_len, self.specials)}
    return pretrain.pair(piece, rng, self.task, self.seq_len, self.specials,
                         other=lambda r: self._foreign(i, r))

  def _foreign(self, i, rng):
    n = len(self.pieces)
    for _ in range(self.NSP_TRIES if n > 1 else 0):
      j = int(rng.integers(n - 1))
      j += j >= i
      if self.pieces.document(j) != self.pieces.document(i):
        return self.pieces[j]
    return None

  def materialise(self, count: int, seed: int) -> dict[str, np.ndarray]:
    """The first `count` examples as arrays (fixed draws from `seed`), e.g. for evaluation."""
    rng = np.random.default_rng([seed, 5])
    rows = [self.example(i, rng) for i in range(min(count, len(self)))]
    if not rows:
      return {'ids': np.zeros((0, self.seq_len), np.int32)}
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@dataclasses.dataclass(frozen=True)
class Masking:
  specials: pretrain.Specials
  vocab_size: int
  mask_prob: float = 0.15
  max_predictions: int = 0  # 0: ceil(seq_len * mask_prob)
  # For whole-word masking: True at the ids of tokens that continue a word (WordPiece's `##x`).
  continuation: np.ndarray | None = None


class _Make:
  """Example `i` with BERT masking, the randomness of both from grain's per-position generator."""

  def __init__(self, examples, masking: Masking, max_predictions: int):
    self.examples = examples
    self.masking = masking
    self.max_predictions = max_predictions

  def __call__(self, i, rng):
    example = self.examples.example(i, rng)
    m = self.masking
    out = pretrain.mask_tokens(example['ids'][None], rng, m.specials, m.vocab_size, m.mask_prob,
                               self.max_predictions, m.continuation)
    out = {k: v[0] for k, v in out.items()}
    out.update({k: v for k, v in example.items() if k != 'ids'})
    return out


def labelled_dataset(fields, batch_size: int, seed: int) -> grain.MapDataset:
  """Batches of `fields` (encoded fine-tuning examples and labels), endless, shuffled afresh every epoch
  from `seed`; a training set smaller than a batch wraps round."""
  if len(fields['ids']) == 0:
    raise ConfigError('no training examples')
  return (grain.MapDataset.source(Rows(fields)).shuffle(seed=seed).repeat(None)
          .batch(batch_size, drop_remainder=True))


def max_predictions_for(seq_len: int, masking: Masking) -> int:
  return masking.max_predictions or max(1, int(np.ceil(seq_len * masking.mask_prob)))


def train_dataset(examples, batch_size: int, seed: int, masking: Masking,
                  shard: grain.sharding.ShardOptions | None = None) -> grain.MapDataset:
  """This process's batches, endless: element `s` is its rows of global batch `s`. `examples`: `Rows`,
  `PieceExamples`, or a dict of arrays (made into `Rows`)."""
  examples = Rows(examples) if isinstance(examples, dict) else examples
  if len(examples) == 0:
    raise ConfigError('no training sequences: the corpus produced no sequence of at least 8 tokens')
  shard = shard or grain.sharding.ShardByJaxProcess(drop_remainder=True)
  if batch_size % shard.shard_count:
    raise ConfigError(f'batch_size ({batch_size}) must be divisible by the number of processes '
                      f'({shard.shard_count})')
  make = _Make(examples, masking, max_predictions_for(examples.seq_len, masking))
  stream = grain.MapDataset.range(len(examples)).shuffle(seed=seed).repeat(None).random_map(make, seed=seed)
  local = stream.batch(batch_size // shard.shard_count, drop_remainder=True)
  return local[shard.shard_index::shard.shard_count]


def _die_with_parent(worker_index: int, worker_count: int) -> None:
  """In each grain worker: exit when the trainer that started it is gone (a SIGKILLed trainer cannot stop its
  workers, which would otherwise live on holding their memory)."""
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(0)
  threading.Thread(target=watch, name='posjax-parent-watch', daemon=True).start()


class _OneDocument:
  """`pieces.Pieces` of one made-up document: a single piece of `body` ordinary (non-special) tokens."""

  def __init__(self, body: int, specials: pretrain.Specials):
    self.body = body
    self.piece = np.full(body, max(dataclasses.astuple(specials)) + 1, np.int32)

  def __len__(self):
    return 1

  def __getitem__(self, i):
    return self.piece

  def document(self, i):
    return 0


def batch_spec(batch_size: int, seq_len: int, task: str | None,
               masking: Masking) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{field: (shape, dtype)} of the global batches `train_dataset` makes for these settings, found by making
  and masking one example of a made-up document with the pipeline's own code (no corpus needed): what an
  ahead-of-time compile of the train step is given."""
  examples = PieceExamples(_OneDocument(pretrain.body_length(seq_len, task), masking.specials), seq_len,
                           masking.specials, task)
  example = _Make(examples, masking, max_predictions_for(seq_len, masking))(0, np.random.default_rng(0))
  return {k: ((batch_size,) + np.shape(v), np.asarray(v).dtype) for k, v in example.items()}


def iterator(dataset: grain.MapDataset, worker_count: int = 0, prefetch: int = 4):
  """A checkpointable iterator (`get_state` / `set_state`) that prepares `prefetch` batches ahead in a
  thread; `worker_count` > 0 masks and batches in that many worker processes instead."""
  # grain's default reads 500 elements ahead in 16 threads: here an element is a whole batch.
  it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  if worker_count:
    if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; outside `app.run`, the defaults
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count), worker_init_fn=_die_with_parent)
  return iter(it)


class MLMBatches:
  """Masked batches of packed examples: the global train batch of any step (random access into
  `train_dataset` of one process), and eval batches with fixed masks.

  `examples` is an NxL id array, or a dict of per-example arrays with `ids` (NxL) and optionally `type_ids`
  (NxL) and `sentence_labels` (N), which are carried into the batches unchanged.
  """

  def __init__(self, examples, batch_size: int, specials: pretrain.Specials, vocab_size: int, seed: int,
               mask_prob: float = 0.15, max_predictions: int | None = None, continuation=None):
    self.fields = examples if isinstance(examples, dict) else {'ids': examples}
    self.batch_size = batch_size
    self.seed = seed
    self.masking = Masking(specials, vocab_size, mask_prob, max_predictions or 0, continuation)
    self.max_predictions = max_predictions_for(self.fields['ids'].shape[1], self.masking)
    self.dataset = train_dataset(self.fields, batch_size, seed, self.masking,
                                 grain.sharding.NoSharding())

  def __len__(self):
    return len(self.fields['ids'])

  def batch(self, step: int) -> dict[str, np.ndarray]:
    return self.dataset[step]

  def eval_batches(self, max_batches: int):
    """Fixed masks (seeded once) over the first `max_batches` full batches, for comparable eval numbers."""
    rng = np.random.default_rng([self.seed, 2])
    n = len(self)
    b = min(self.batch_size, n)
    m = self.masking
    for start in range(0, min(n, max_batches * b), b):
      if start + b > n:  # keep shapes static for the jitted eval step
        break
      idx = np.arange(start, start + b)
      batch = pretrain.mask_tokens(self.fields['ids'][idx], rng, m.specials, m.vocab_size, m.mask_prob,
                                   self.max_predictions, m.continuation)
      batch.update({k: v[idx] for k, v in self.fields.items() if k != 'ids'})
      yield batch


def word_continuations(tokenizer) -> np.ndarray:
  """True at the ids of tokens that continue a word: WordPiece's `##x`, or, in SentencePiece vocabularies,
  pieces that do not start with the word marker `▁`."""
  vocab = tokenizer.get_vocab()
  out = np.zeros(max(vocab.values()) + 1, bool)
  sentencepiece = any(t.startswith('▁') for t in vocab)
  for token, i in vocab.items():
    out[i] = (not token.startswith('▁') and not (token.startswith('[') or token.startswith('<'))
              if sentencepiece else token.startswith('##'))
  return out
